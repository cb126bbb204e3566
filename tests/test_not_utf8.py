"""Raw files with bytes that are not UTF-8: MovieLens layouts and LastFM-1K skip and count such a
line like any malformed one; a CSV/TSV table is refused, naming the line; a CSV time column
holding inf or huge numbers is refused, naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

import fixtures_raw as fx
from seqexp.core.errors import SeqexpError
from seqexp.data.interactions import raw_ids
from seqexp.data.lastfm import read_lastfm
from seqexp.data.movielens import read_movielens
from seqexp.data.tabular import read_table

LAYOUTS = ["ratings_dat", "u_data", "ratings_csv"]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def movielens_bytes(layout: str, lines: list[str], extra: list[bytes], at: int) -> list[bytes]:
    rows = [fx.movielens_line(line, layout).encode() for line in lines]
    sep = fx.ML_SEPARATORS[layout].encode()
    rows[at:at] = [line.replace(b"::", sep) for line in extra]
    if layout == "ratings_csv":
        rows.insert(0, fx.ML20M_HEADER.encode())
    return rows


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", [b"7::10\xe91::4::1000",  # in an id
                                 b"7::101::4::10\xff00",  # in the timestamp
                                 b"7::101\xe9",  # and a wrong field count
                                 b"\xc3::101::4::1000"])  # a cut multi-byte character
def test_movielens_line_not_utf8_is_skipped_and_counted(tmp_path, capfd, layout, bad):
    rows = movielens_bytes(layout, fx.ML_LINES, [bad], at=4)
    raw = read_movielens(write_lines(tmp_path / "r", rows), layout)
    assert (len(raw), raw.skipped_lines) == (fx.ML_N_ROWS, 1)
    assert 7 not in raw_ids(raw.user, raw.user_labels).astype(int)
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_movielens_rating_field_is_not_read_so_not_checked(tmp_path, layout):
    rows = movielens_bytes(layout, fx.ML_LINES, [b"7::101::\xe9::1000"], at=0)
    raw = read_movielens(write_lines(tmp_path / "r", rows), layout)
    assert (len(raw), raw.skipped_lines) == (fx.ML_N_ROWS + 1, 0)


def lastfm_lines() -> list[bytes]:
    return [(row if isinstance(row, str) else "\t".join(row)).encode()
            for row in fx.LASTFM_ROWS]


@pytest.mark.parametrize("bad", [
    "user_000003\t2009-05-04T23:10:00Z\t\tBj\xf6rk\t\tJ\xf3ga".encode("latin-1"),  # names
    b"user_00\xe9003\t2009-05-04T23:10:00Z\t\tA\t\tB",  # the user id
    b"user_000003\t2009-05-04T23:10:00Z\t\tBj\xf6rk",  # and a wrong field count
])
def test_lastfm_latin1_name_is_skipped_and_counted(tmp_path, capfd, bad):
    rows = lastfm_lines()
    rows.insert(3, bad)
    raw = read_lastfm(write_lines(tmp_path / "l.tsv", rows), item="track")
    assert len(raw) == fx.LASTFM_N_ROWS
    assert raw.skipped_lines == fx.LASTFM_SKIPPED + 1
    assert raw.notes["lines_not_utf8"] == 1
    assert raw.notes["lines_wrong_field_count"] == fx.LASTFM_WRONG_FIELD_COUNT
    assert sorted(set(raw.user_labels)) == [fx.U1, fx.U2]
    assert "Exception ignored" not in capfd.readouterr().err


def test_lastfm_utf8_names_are_kept(tmp_path):
    rows = lastfm_lines()
    rows.insert(0, "user_000003\t2009-05-04T23:10:00Z\t\tBjörk\t\tJóga".encode())
    raw = read_lastfm(write_lines(tmp_path / "l.tsv", rows), item="track")
    assert raw.skipped_lines == fx.LASTFM_SKIPPED
    assert "Björk\tJóga" in set(raw.item_labels)


# the header of the tables below, in conf/dataset/csv.yaml's terms
CSV_COLUMNS = {"user_col": "user", "item_col": "item", "time_col": "timestamp", "sep": None}


@pytest.mark.parametrize("line", [b"carol,p\xe92,100", b"carol,p2,1\xe900"])
def test_table_not_utf8_is_an_error_naming_the_line(tmp_path, line):
    path = write_lines(tmp_path / "e.csv", [b"user,item,timestamp", b"alice,p1,5", line])
    with pytest.raises(SeqexpError, match=r"e\.csv: line 3 is not UTF-8 text; save the file"):
        read_table(path, **CSV_COLUMNS)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e30", "9007199254740993"])
def test_table_time_out_of_range_is_an_error_naming_the_line(tmp_path, value):
    path = write_lines(tmp_path / "e.csv", [b"user,item,timestamp", b"alice,p1,5",
                                            b"bob,p1,7", f"carol,p2,{value}".encode()])
    with pytest.raises(SeqexpError, match=r"e\.csv: line 4: timestamp=.* is not a time"):
        read_table(path, **CSV_COLUMNS)


def test_table_time_limit_itself_and_fractions_are_accepted(tmp_path):
    path = write_lines(tmp_path / "e.csv", [b"user,item,timestamp", b"alice,p1,5.7",
                                            b"carol,p2,-9007199254740992.0"])
    assert read_table(path, **CSV_COLUMNS).timestamp.tolist() == [5, -(2**53)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", ["::101::4::1000", "7::::4::1000", "7::101::4::"])
def test_movielens_empty_id_or_time_is_skipped_and_counted(tmp_path, layout, bad):
    rows = movielens_bytes(layout, fx.ML_LINES, [bad.encode()], at=2)
    raw = read_movielens(write_lines(tmp_path / "r", rows), layout)
    assert (len(raw), raw.skipped_lines) == (fx.ML_N_ROWS, 1)
    assert raw.timestamp.min() >= 500  # no null turned into -2**63
    assert 7 not in raw_ids(raw.user, raw.user_labels).astype(int)
