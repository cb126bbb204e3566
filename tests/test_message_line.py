"""The one line of an exception that seqexp shows in place of a traceback."""

from __future__ import annotations

from seqexp.core.errors import message_line


def test_the_first_line_by_default_the_last_on_request_and_cut_to_a_limit():
    exc = ValueError("  outer context\ninner reason: x must be positive  ")
    assert message_line(exc) == "outer context"
    assert message_line(exc, which=-1) == "inner reason: x must be positive"
    assert message_line(ValueError("a" * 500), limit=300) == "a" * 300


def test_an_empty_message_gives_the_exception_type():
    assert message_line(KeyError()) == "KeyError"
    assert message_line(RuntimeError(" \n "), which=-1) == "RuntimeError"
