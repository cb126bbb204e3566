"""Where a dataset's raw file is: dataset.path, or the official archive's member downloaded and
unpacked on first use. Light (no pandas, no torch), so that the command line's checks can find
every job's data before a multirun starts (seqexp.apps.preflight)."""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from pathlib import Path

from seqexp.core.errors import UNWRITABLE_ERRNOS, SeqexpError, unwritable
from seqexp.data import download

log = logging.getLogger(__name__)


def _existing_file(path: Path) -> Path:
    """`path` when it is a regular file to read, else one line saying what it is instead."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SeqexpError(f"dataset.path={path}: file not found; pass an existing file") from None
    except OSError as exc:
        raise SeqexpError(f"dataset.path={path}: cannot read it ({exc.strerror}); pass a file "
                          f"you can read") from None
    if stat.S_ISDIR(mode):
        raise SeqexpError(f"dataset.path={path} is a folder; pass the data file in it")
    if not stat.S_ISREG(mode):
        raise SeqexpError(f"dataset.path={path} is not a regular file (a pipe or a device); "
                          f"pass a data file")
    return path


def resolve_raw_file(dataset: Mapping, raw_dir: Path, progress: bool) -> Path:
    """The local raw file: dataset.path when given, else the official archive's member,
    downloaded and unpacked into raw_dir on first use."""
    if dataset.get("path") not in (None, ""):
        return _existing_file(Path(str(dataset["path"])).expanduser())
    url, member = dataset.get("url"), dataset.get("archive_member")
    if not url or not member:
        raise SeqexpError(
            f"dataset {dataset.get('name')!r} has no download source: pass dataset.path=FILE"
        )
    folder = raw_dir / str(dataset.get("name"))
    target = folder / Path(member).name
    if target.is_file():
        return target
    # The archive's name: the URL's last segment, without a query (?download=1).
    archive = folder / url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    remote = verified_source(dataset)
    try:
        download.fetch(remote, archive, progress=progress)
        download.extract_member(archive, member, target)
    except SeqexpError as exc:
        raise SeqexpError(
            f"{exc}; download {url} by hand and put {Path(member).name} at {target}, "
            f"or pass dataset.path=/path/to/{Path(member).name}"
        ) from None
    except OSError as exc:
        if exc.errno not in UNWRITABLE_ERRNOS:
            raise
        raise unwritable(folder, exc, "the downloaded data", "paths.raw_dir") from None
    return target


def verified_source(dataset: Mapping) -> download.RemoteFile:
    """The archive to download with the size and md5 it must have. Only an explicit
    dataset.verify=false downloads without that check (with a warning); a dataset that names no
    md5 must say so."""
    url, size, md5 = dataset["url"], dataset.get("archive_size"), dataset.get("archive_md5")
    if not dataset["verify"]:
        log.warning("dataset.verify=false: %s is downloaded WITHOUT checking its size and md5; "
                    "the run's data.sha256 param still records which file it used", url)
        return download.RemoteFile(url, None, None)
    if md5 is None:
        raise SeqexpError(
            f"dataset {dataset.get('name')!r}: no dataset.archive_md5 to verify {url} against; "
            "set dataset.archive_md5=<the publisher's md5> (and dataset.archive_size=<bytes>), "
            "or pass dataset.verify=false to download it unverified")
    return download.RemoteFile(url, size, md5)
