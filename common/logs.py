"""The ``fedswarm`` logger: one line per event, lazy %-formatting, on stderr."""

from __future__ import annotations

import logging
import sys
import warnings

# Third-party notices that are not the user's business: Ray's accelerator-env tip (fedswarm sets
# each client's GPUs itself), Flower's note that federated evaluation is off (the coordinator
# evaluates centrally by design), and transformers' legacy-tokeniser notice (the behaviour is the one
# the model was trained with).
QUIET_MESSAGES = {
    "flwr": ("fraction_evaluate is set to 0.0",),
    "transformers": ("You are using the default legacy behaviour",),
}
QUIET_WARNINGS = (r"Tip: In future versions of Ray, Ray will no longer override accelerator",)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Drop the third-party notices in ``QUIET_MESSAGES`` and ``QUIET_WARNINGS`` (idempotent)."""
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        # on the logger (its own records) and on its handlers (its children's records, which propagate)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, _DropMessages) for f in target.filters):
                target.addFilter(_DropMessages(prefixes))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    quiet_third_party()
    logger = logging.getLogger("fedswarm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s fedswarm %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return logger
