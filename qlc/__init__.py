"""qlc: a declarative QLoRA fine-tuning compiler and containerized runner."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qlc")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
