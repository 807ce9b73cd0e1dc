"""The package version (its own module, so `llmserve/__init__.py` and http/ need not import
each other)."""

__version__ = "0.1.0"
