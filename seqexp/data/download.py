"""Resumable, verified downloads of the raw dataset archives, and single-member extraction."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from seqexp.core.errors import UNWRITABLE_ERRNOS, SeqexpError
from seqexp.core.file_modes import file_mode

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat
_USER_AGENT = "seqexp-downloader"  # some hosts reject urllib's default agent
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    """An archive on the web, with its expected byte size and hex md5 when known."""

    url: str
    size: int | None
    md5: str | None


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: Path, remote: RemoteFile) -> str | None:
    """Describe how path differs from what remote promises, or None when it matches."""
    actual_size = path.stat().st_size
    if remote.size is not None and actual_size != remote.size:
        return f"size {actual_size} bytes, expected {remote.size}"
    if remote.md5 is not None:
        actual_md5 = _md5_of(path)
        if actual_md5 != remote.md5.lower():
            return f"md5 {actual_md5}, expected {remote.md5.lower()}"
    return None


def _range_start(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE.match(content_range or "")
    return int(match.group(1)) if match else None


def _stream(remote: RemoteFile, part: Path, offset: int, progress: bool, timeout_s: float) -> None:
    """Append the bytes from offset on to part; a short read leaves part for the next resume."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left past offset: the part is probably complete, and verification decides.
            return
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file: start over
        elif offset and _range_start(response.headers.get("Content-Range")) != offset:
            raise SeqexpError(
                f"could not download {remote.url}: server answered Range bytes={offset}- with "
                f"Content-Range {response.headers.get('Content-Range')!r}"
            )
        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + expected if expected is not None else remote.size
        received = 0
        with (
            part.open("ab" if offset else "wb") as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=None if progress else True,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # urllib returns b"" rather than raising when the peer closes early, so check by count.
    if expected is not None and received < expected:
        raise SeqexpError(
            f"could not download {remote.url}: connection closed after {offset + received} of "
            f"{offset + expected} bytes (run again to resume)"
        )


def fetch(
    remote: RemoteFile, dest: Path, *, progress: bool = True, timeout_s: float = 60.0
) -> Path:
    """Download remote.url to dest, resuming dest.part, verifying size/md5, replacing atomically.

    An existing dest that matches the known size (and md5) is returned without any request.
    """
    dest = Path(dest)
    if dest.is_file() and _mismatch(dest, remote) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    offset = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if remote.size is None or offset < remote.size or not part.is_file():
        try:
            _stream(remote, part, offset, progress, timeout_s)
        except urllib.error.HTTPError as exc:
            raise SeqexpError(
                f"could not download {remote.url}: HTTP {exc.code} {exc.reason}"
            ) from exc
        except urllib.error.URLError as exc:
            raise SeqexpError(f"could not download {remote.url}: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
                raise  # the local disk's fault: the caller names the folder
            # Timeouts, resets and disconnects mid-body surface here rather than as URLError.
            reason = str(exc) or type(exc).__name__
            raise SeqexpError(f"could not download {remote.url}: {reason}") from exc

    problem = _mismatch(part, remote)
    if problem is not None:
        # A corrupt part would poison every later resume, so it goes.
        part.unlink(missing_ok=True)
        raise SeqexpError(f"download of {remote.url} failed verification: {problem}")
    os.replace(part, dest)
    return dest


@contextmanager
def _open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Yield a binary stream of member, positioned without reading the whole archive."""
    missing = SeqexpError(f"archive {archive} has no file {member!r}")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise missing from None
            if info.is_dir():
                raise missing
            with zf.open(info) as src:
                yield src
        return
    if not tarfile.is_tarfile(archive):
        raise SeqexpError(f"archive {archive} is neither a zip nor a tar(.gz) file")
    wanted = member.removeprefix("./")
    with tarfile.open(archive, "r:*") as tf:
        # Iterate instead of getmember(): that would decompress the whole .tar.gz to index it
        # first, then decompress again up to the member.
        for info in tf:
            if info.name.removeprefix("./") == wanted and info.isfile():
                src = tf.extractfile(info)
                if src is None:
                    break
                with src:
                    yield src
                return
    raise missing


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a .zip or .tar.gz/.tgz archive to dest, replacing it atomically."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise SeqexpError(f"archive {archive} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as dest, so os.replace stays a rename on one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _open_member(archive, member) as src:
            while block := src.read(CHUNK):
                out.write(block)
        os.chmod(tmp, file_mode())  # mkstemp's 600: the mode a new file gets under the umask
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        tmp.unlink(missing_ok=True)
        raise SeqexpError(f"archive {archive} is corrupt ({exc}); delete it and retry") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
