"""User-facing errors: one line, naming the file or config key and what to do."""

import errno
from pathlib import Path

# Errors of a file system that cannot take a write, as opposed to a network's or a bug's
# (EFBIG: the process's file size limit, `ulimit -f`).
UNWRITABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                     errno.EPERM}


class SeqexpError(Exception):
    """An error caused by input or configuration; shown as one line, without a traceback."""


def message_line(exc: BaseException, which: int = 0, limit: int | None = None) -> str:
    """One line of an exception's message, the first by default (`which=-1`: the last, where a
    library puts its own summary under a context), cut to `limit` characters; the exception's
    type name when the message is empty."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[which]
    return line if limit is None else line[:limit]


def unwritable(where: Path, exc: OSError, what: str, key: str | None,
               also: str = "paths.data_dir=") -> SeqexpError:
    """The one-line error for a folder seqexp cannot write in (read-only, no permission, full,
    a file over the size limit): which folder, why, and the key that moves the writes elsewhere
    (`also`: another one that does; None: nothing can move them)."""
    reason = exc.strerror or str(exc)
    other = f" (or {also})" if also else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = ("free some space there" if key is None else
                  f"free some space there or set {key}=/a/folder/with/space{other}")
    elif exc.errno == errno.EFBIG:
        advice = "the file outgrows this process's file size limit: raise it (ulimit -f)"
    else:
        advice = ("make it writable" if key is None else
                  f"set {key}=/a/writable/folder{other}")
    return SeqexpError(f"cannot write {what} in {where} ({reason}); {advice}")
