"""User-facing errors: the CLI prints them as one line and exits 2.

They live here, torch-free, so that a process that runs no model (the sink, the dashboard, every
``--help``) can catch a model's error without importing the model code.
"""


class UserError(Exception):
    """Bad input from the person at the keyboard (a file, a setting, a flag).

    The message must name the file or field and the problem, on one line.
    """


class ModelError(ValueError):
    """A model cannot be built, fitted or loaded; the message names the cause."""
