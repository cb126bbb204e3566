"""User-facing errors: one line, naming the file or config key and what to do."""

from collections.abc import Iterable


class SeqexpError(Exception):
    """An error caused by input or configuration; shown as one line, without a traceback."""


def check_option(key: str, value: object, valid: bool, requirement: str) -> None:
    """A model option's one-line error: `model.<key>=<value> must <requirement>`."""
    if not valid:
        raise SeqexpError(f"model.{key}={value} must {requirement}")


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    """A model option that names one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise SeqexpError(f"model.{key}={value!r} is unknown; choose one of {', '.join(choices)}")
