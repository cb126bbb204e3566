"""Tests for seqexp.data.download against a loopback HTTP server (no real network)."""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seqexp.core.errors import SeqexpError
from seqexp.core.resources import config_dir
from seqexp.data.download import RemoteFile, extract_member, fetch

PAYLOAD = random.Random(0).randbytes(2 * (1 << 20) + 12_345)  # spans several 1 MiB chunks
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Server(ThreadingHTTPServer):
    """Loopback server whose behaviour the tests switch per case."""

    files: dict[str, bytes]
    requests: list[tuple[str, str | None]]
    ignore_range: bool
    drop_after: int | None
    delay_s: float

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out or hang up on purpose would only add traceback noise


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # name fixed by BaseHTTPRequestHandler
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        if srv.delay_s:
            time.sleep(srv.delay_s)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        start = 0
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drop_after is not None:
            # Promise the full length, then hang up: the client sees a truncated body.
            self.wfile.write(body[: srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files = {"/data.bin": PAYLOAD}
    srv.requests = []
    srv.ignore_range = False
    srv.drop_after = None
    srv.delay_s = 0.0
    # A short poll interval keeps shutdown() (and so each test's teardown) fast.
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url(srv: _Server, path: str = "/data.bin") -> str:
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}{path}"


def _remote(srv: _Server, *, size: int | None = len(PAYLOAD), md5: str | None = PAYLOAD_MD5):
    return RemoteFile(_url(srv), size=size, md5=md5)


# --- fetch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [False, True])
def test_full_download_is_verified_and_atomic(server: _Server, tmp_path: Path, progress: bool):
    dest = tmp_path / "nested" / "dir" / "data.bin"
    out = fetch(_remote(server), dest, progress=progress)
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("data.bin.part").exists()
    assert server.requests == [("/data.bin", None)]


def test_unknown_size_and_md5_still_downloads(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    fetch(_remote(server, size=None, md5=None), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_resume_from_existing_part(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    done = 1_500_000
    part.write_bytes(PAYLOAD[:done])
    fetch(_remote(server), dest, progress=False)
    assert server.requests == [("/data.bin", f"bytes={done}-")]
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_dropped_connection_keeps_part_and_next_call_resumes(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    server.drop_after = 700_000
    with pytest.raises(SeqexpError, match="could not download") as excinfo:
        fetch(_remote(server), dest, progress=False)
    assert _url(server) in str(excinfo.value)
    assert not dest.exists()
    assert part.read_bytes() == PAYLOAD[:700_000]

    server.drop_after = None
    fetch(_remote(server), dest, progress=False)
    assert server.requests[-1] == ("/data.bin", "bytes=700000-")
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    part.write_bytes(PAYLOAD[:1000])
    server.ignore_range = True
    fetch(_remote(server), dest, progress=False)
    assert server.requests == [("/data.bin", "bytes=1000-")]  # asked, got a plain 200
    assert dest.read_bytes() == PAYLOAD  # no duplicated prefix
    assert not part.exists()


def test_complete_part_is_verified_without_request(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    fetch(_remote(server), dest, progress=False)
    assert server.requests == []
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_with_unknown_size_survives_416(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    fetch(_remote(server, size=None), dest, progress=False)
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]
    assert dest.read_bytes() == PAYLOAD


def test_wrong_md5_raises_and_leaves_nothing(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    bad = "0" * 32
    with pytest.raises(SeqexpError) as excinfo:
        fetch(_remote(server, md5=bad), dest, progress=False)
    message = str(excinfo.value)
    assert _url(server) in message and bad in message and PAYLOAD_MD5 in message
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_wrong_size_raises_and_leaves_nothing(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    with pytest.raises(SeqexpError) as excinfo:
        fetch(_remote(server, size=len(PAYLOAD) + 1, md5=None), dest, progress=False)
    message = str(excinfo.value)
    assert _url(server) in message
    assert str(len(PAYLOAD)) in message and str(len(PAYLOAD) + 1) in message
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_part_longer_than_expected_size_is_discarded(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD + b"junk")
    fetch(_remote(server), dest, progress=False)
    assert server.requests == [("/data.bin", None)]
    assert dest.read_bytes() == PAYLOAD


def test_connection_refused_names_url(tmp_path: Path):
    with socket.socket() as sock:  # grab a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-10m.zip"
    with pytest.raises(SeqexpError) as excinfo:
        fetch(RemoteFile(url, size=None, md5=None), tmp_path / "x.zip", progress=False)
    assert str(excinfo.value).startswith(f"could not download {url}: ")
    assert not (tmp_path / "x.zip").exists()


def test_http_error_names_url_and_status(server: _Server, tmp_path: Path):
    url = _url(server, "/missing.zip")
    with pytest.raises(SeqexpError, match="404") as excinfo:
        fetch(RemoteFile(url, size=None, md5=None), tmp_path / "x.zip", progress=False)
    assert f"could not download {url}" in str(excinfo.value)


def test_timeout_becomes_seqexp_error(server: _Server, tmp_path: Path):
    server.delay_s = 2.0
    with pytest.raises(SeqexpError, match="could not download"):
        fetch(_remote(server), tmp_path / "data.bin", progress=False, timeout_s=0.2)


def test_existing_complete_dest_makes_no_request(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    assert fetch(_remote(server), dest, progress=False) == dest
    assert server.requests == []


def test_existing_wrong_dest_is_replaced(server: _Server, tmp_path: Path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    fetch(_remote(server), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


# GroupLens' published md5 sidecars and the archives' byte counts.
GROUPLENS = {
    "ml100k": ("ml-100k.zip", 4_924_029, "0e33842e24a9c977be4e0107933c0723", "ml-100k/u.data"),
    "ml1m": ("ml-1m.zip", 5_917_549, "c4d9eecfca2ab87c1945afe126590906", "ml-1m/ratings.dat"),
    "ml10m": ("ml-10m.zip", 65_566_137, "ce571fd55effeba0271552578f2648bd",
              "ml-10M100K/ratings.dat"),
    "ml20m": ("ml-20m.zip", 198_702_078, "cd245b17a1ae2cc31bb14903e1204af3",
              "ml-20m/ratings.csv"),
}


def test_official_sources_in_the_dataset_configs_are_well_formed():
    with_url = [path.stem for path in sorted((config_dir() / "dataset").glob("*.yaml"))
                if OmegaConf.load(path).get("url")]
    assert set(with_url) == {"lastfm", *GROUPLENS}
    for name in with_url:
        cfg = OmegaConf.load(config_dir() / "dataset" / f"{name}.yaml")
        assert cfg.url.startswith("https://")  # every host offers HTTPS
        assert re.fullmatch(r"[0-9a-f]{32}", cfg.archive_md5)  # every archive is verified
        assert cfg.verify is True
        assert cfg.archive_size is None or cfg.archive_size > 0
    for name, (archive, size, md5, member) in GROUPLENS.items():
        cfg = OmegaConf.load(config_dir() / "dataset" / f"{name}.yaml")
        assert cfg.url == f"https://files.grouplens.org/datasets/movielens/{archive}"
        assert (cfg.archive_size, cfg.archive_md5, cfg.archive_member) == (size, md5, member)


# --- extract_member ----------------------------------------------------------------------------

MEMBER = "ml-10M100K/ratings.dat"
MEMBER_BYTES = b"1::122::5::838985046\n" * 50_000  # ~1 MiB, so the copy loops


def _make_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ml-10M100K/", "")
        zf.writestr("ml-10M100K/movies.dat", b"1::Toy Story (1995)::Animation\n")
        zf.writestr(MEMBER, MEMBER_BYTES)
    return path


def _make_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [("ml-10M100K/movies.dat", b"movies\n"), (MEMBER, MEMBER_BYTES)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


ARCHIVES = [
    pytest.param(_make_zip, "a.zip", id="zip"),
    pytest.param(_make_tar, "a.tar.gz", id="tar.gz"),
    pytest.param(_make_tar, "a.tgz", id="tgz"),
]


@pytest.mark.parametrize(("make", "name"), ARCHIVES)
def test_extract_member(tmp_path: Path, make, name: str):
    archive = make(tmp_path / name)
    dest = tmp_path / "out" / "sub" / "ratings.dat"
    assert extract_member(archive, MEMBER, dest) == dest
    assert dest.read_bytes() == MEMBER_BYTES
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ratings.dat"]  # no temp left


@pytest.mark.parametrize(("make", "name"), ARCHIVES)
def test_extract_member_overwrites_existing_dest(tmp_path: Path, make, name: str):
    archive = make(tmp_path / name)
    dest = tmp_path / "ratings.dat"
    dest.write_bytes(b"old")
    extract_member(archive, MEMBER, dest)
    assert dest.read_bytes() == MEMBER_BYTES


@pytest.mark.parametrize(("make", "name"), ARCHIVES)
def test_extract_missing_member_raises(tmp_path: Path, make, name: str):
    archive = make(tmp_path / name)
    out = tmp_path / "out"
    with pytest.raises(SeqexpError) as excinfo:
        extract_member(archive, "ml-10M100K/nope.dat", out / "nope.dat")
    message = str(excinfo.value)
    assert str(archive) in message and "ml-10M100K/nope.dat" in message
    assert list(out.iterdir()) == []  # neither dest nor a temp file


@pytest.mark.parametrize(("make", "name"), ARCHIVES)
def test_extract_directory_entry_is_not_a_member(tmp_path: Path, make, name: str):
    archive = make(tmp_path / name)
    with pytest.raises(SeqexpError, match="has no file"):
        extract_member(archive, "ml-10M100K/", tmp_path / "x")


def test_extract_from_non_archive_raises(tmp_path: Path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"this is not an archive")
    with pytest.raises(SeqexpError, match="neither a zip nor a tar"):
        extract_member(bogus, MEMBER, tmp_path / "x")


def test_extract_from_missing_archive_raises(tmp_path: Path):
    with pytest.raises(SeqexpError, match="does not exist"):
        extract_member(tmp_path / "absent.zip", MEMBER, tmp_path / "x")


def test_extract_from_truncated_tar_gz_raises(tmp_path: Path):
    archive = _make_tar(tmp_path / "a.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(SeqexpError, match="corrupt"):
        extract_member(archive, MEMBER, out / "ratings.dat")
    assert list(out.iterdir()) == []


# --- resolve_raw_file: the dataset config's archive, verified -----------------------------------

LASTFM_MEMBER = "lastfm-dataset-1K/userid-timestamp-artid-artname-traid-traname.tsv"


def _lastfm_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        data = b"user_000001\t2009-05-04T23:08:57Z\t\tA\t\tB\n"
        info = tarfile.TarInfo(LASTFM_MEMBER)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _lastfm_dataset(server: _Server, **overrides) -> dict:
    archive = _lastfm_archive()
    # As on Zenodo: the file name, then a query.
    server.files["/records/1/files/lastfm-dataset-1K.tar.gz?download=1"] = archive
    return {"name": "lastfm", "path": None, "archive_member": LASTFM_MEMBER,
            "url": _url(server, "/records/1/files/lastfm-dataset-1K.tar.gz?download=1"),
            "archive_size": None, "archive_md5": hashlib.md5(archive).hexdigest(),
            "verify": True} | overrides


def test_dataset_archive_is_downloaded_verified_and_unpacked(server, tmp_path):
    from seqexp.data.loading import resolve_raw_file

    target = resolve_raw_file(_lastfm_dataset(server), tmp_path, progress=False)
    assert target == tmp_path / "lastfm" / Path(LASTFM_MEMBER).name
    assert target.read_bytes().startswith(b"user_000001\t")
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "lastfm-dataset-1K.tar.gz", target.name]


def test_dataset_archive_with_a_wrong_md5_is_refused_and_removed(server, tmp_path):
    from seqexp.data.loading import resolve_raw_file

    dataset = _lastfm_dataset(server, archive_md5="0" * 32)
    with pytest.raises(SeqexpError, match=r"failed verification: md5 [0-9a-f]{32}, expected 0{32}"
                                          r"; download .* by hand"):
        resolve_raw_file(dataset, tmp_path, progress=False)
    assert list((tmp_path / "lastfm").iterdir()) == []


def test_dataset_without_md5_needs_verify_false(server, tmp_path, caplog):
    from seqexp.data.loading import resolve_raw_file

    dataset = _lastfm_dataset(server, archive_md5=None)
    with pytest.raises(SeqexpError, match=r"no dataset.archive_md5 to verify .* against; set "
                                          r"dataset.archive_md5=.* or pass dataset.verify=false"):
        resolve_raw_file(dataset, tmp_path, progress=False)
    assert server.requests == []  # refused before any download
    bad = _lastfm_dataset(server, archive_md5="0" * 32, verify=False)
    target = resolve_raw_file(bad, tmp_path, progress=False)
    assert target.is_file()
    assert "dataset.verify=false" in caplog.text and "WITHOUT checking" in caplog.text
