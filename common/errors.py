"""User-facing errors: one line, naming what is wrong, shown without a traceback."""


class FedswarmError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


class InputError(FedswarmError, ValueError):
    """A bad value the user gave (an option, a file's content): a ``ValueError`` too, for callers that check one.

    The CLI reports ``FedswarmError`` (this included) in one line and lets every other exception,
    a plain ``ValueError`` from a library included, show its traceback: a bug is not the user's mistake.
    """
