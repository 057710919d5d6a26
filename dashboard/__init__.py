"""linewatch dashboard."""
