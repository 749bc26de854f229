"""The compiler: spec -> plan -> build context. Pure: no I/O beyond its own package data."""
