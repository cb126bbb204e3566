"""The modes of the files and folders seqexp writes: what a plain `open`/`mkdir` would give them
under the process's umask (666 / 777 less the umask), for files made under a private temporary
name (mkstemp's 600, mkdtemp's 700) before they take their final name.

Standard library only: the wheel's build hook and every layer use it."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status), so that no
    other thread ever creates a file under a different one; elsewhere set and put back."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()
