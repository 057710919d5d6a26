"""linewatch producers."""
