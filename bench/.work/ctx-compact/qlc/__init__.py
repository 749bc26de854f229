"""qlc: a declarative QLoRA fine-tuning compiler and containerized runner."""

# The single source of the version (pyproject reads it): no importlib.metadata at start-up.
__version__ = "0.1.0"
