"""linewatch workers."""
