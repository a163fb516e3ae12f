"""User-facing errors: one line, naming what is wrong, shown without a traceback."""


class FedswarmError(Exception):
    """An error caused by the user's input or environment, reported as one line."""
