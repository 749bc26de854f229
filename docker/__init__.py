"""Hand-written parts of images."""
