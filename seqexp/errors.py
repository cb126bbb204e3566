"""User-facing errors: one line, naming the file or config key and what to do."""


class SeqexpError(Exception):
    """An error caused by input or configuration; shown as one line, without a traceback."""
