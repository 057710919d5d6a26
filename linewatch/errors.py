"""User-facing errors: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input from the person at the keyboard (a file, a setting, a flag).

    The message must name the file or field and the problem, on one line.
    """
