"""linewatch: visual inspection for production lines (shared core package)."""

__version__ = "0.1.0"
