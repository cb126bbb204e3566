"""Raw-format readers: MovieLens ratings.dat, LastFM-1K TSV, CSV/TSV/Parquet tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import fixtures_raw as fx
from helpers import preprocess, split_preset
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import config_dir
from seqexp.data.lastfm import read_lastfm
from seqexp.data.loading import load_dataset
from seqexp.data.movielens import read_movielens
from seqexp.data.tabular import read_table

USER_TAIL = split_preset()


def first_occurrence_codes(values: list) -> list[int]:
    """Relabel values by order of first appearance: compares identity patterns of item codes
    without depending on how a reader numbers its items."""
    seen: dict = {}
    return [seen.setdefault(value, len(seen)) for value in values]


def user_items(data, user: int) -> list[int]:
    return data.items[data.offsets[user]:data.offsets[user + 1]].tolist()


# ------------------------------------------------------------------------------ MovieLens
# The same 17 ratings in each GroupLens layout: ML-1M/10M ratings.dat, ML-100K u.data, ML-20M
# ratings.csv (with its header line).
LAYOUTS = ["ratings_dat", "u_data", "ratings_csv"]
DATASET_LAYOUTS = {"ml100k": "u_data", "ml1m": "ratings_dat", "ml10m": "ratings_dat",
                   "ml20m": "ratings_csv"}
LAYOUT_DESCRIPTIONS = {"ratings_dat": "UserID::MovieID::Rating::Timestamp",
                       "u_data": "user id<TAB>item id<TAB>rating<TAB>timestamp",
                       "ratings_csv": "userId,movieId,rating,timestamp"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_movielens_counts_and_file_order(tmp_path: Path, layout: str) -> None:
    path = fx.write_movielens(tmp_path, layout=layout)
    raw = read_movielens(path, layout)
    assert len(raw) == fx.ML_N_ROWS == 17
    assert len(np.unique(raw.user)) == fx.ML_N_USERS == 3
    assert len(np.unique(raw.item)) == fx.ML_N_ITEMS == 6
    assert raw.skipped_lines == 0  # the ml-20m header is skipped, not counted as malformed
    assert raw.source == str(path)
    # Rows stay in file order (the tie-break for equal timestamps).
    assert raw.user.tolist() == [int(line.split("::")[0]) for line in fx.ML_LINES]
    assert raw.timestamp.tolist() == [int(line.split("::")[3]) for line in fx.ML_LINES]
    # Item codes are order-preserving: equal movies share a code, distinct movies do not.
    movies = [int(line.split("::")[1]) for line in fx.ML_LINES]
    assert first_occurrence_codes(raw.item.tolist()) == first_occurrence_codes(movies)
    order = np.argsort(raw.item, kind="stable")
    assert np.all(np.diff(np.asarray(movies)[order]) >= 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_movielens_equal_timestamps_keep_file_order_after_build(tmp_path: Path, layout: str):
    data = preprocess(read_movielens(fx.write_movielens(tmp_path, layout=layout), layout),
                           USER_TAIL)
    # All six movies are in the training vocabulary, so code = rank of the movie id.
    assert data.n_items == 6
    for code, raw_user in enumerate(sorted(fx.ML_ORDERED)):
        assert user_items(data, code) == [m - 101 for m in fx.ML_ORDERED[raw_user]]
    assert user_items(data, 0) == [4, 0, 1, 2, 5, 3, 0]  # user 1, hand-ordered
    # Lengths 7, 5, 5: one test event each (floor(0.2 L)), no validation (floor(0.1 * rest)).
    assert data.offsets.tolist() == [0, 7, 12, 17]
    assert data.train_end.tolist() == [6, 11, 16]
    assert data.val_end.tolist() == [6, 11, 16]
    assert data.timestamps[:7].tolist() == [995, 1000, 1000, 1000, 1000, 1010, 1020]
    assert data.stats["train_events"] == 14
    assert data.stats["test_events"] == 3
    assert data.stats["test_oov_dropped"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_movielens_crlf_line_ends_parse_the_same(tmp_path: Path, layout: str) -> None:
    unix = read_movielens(fx.write_movielens(tmp_path, "unix.txt", layout=layout), layout)
    dos = read_movielens(fx.write_movielens(tmp_path, "dos.txt", newline="\r\n",
                                            layout=layout), layout)
    for name in ("user", "item", "timestamp"):
        np.testing.assert_array_equal(getattr(unix, name), getattr(dos, name))
    assert dos.skipped_lines == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_movielens_malformed_lines_are_counted_not_fatal(tmp_path: Path, layout: str) -> None:
    lines = fx.ML_LINES[:5] + ["4::101::3", "5::102::4::1::7"] + fx.ML_LINES[5:]
    raw = read_movielens(fx.write_movielens(tmp_path, lines=lines, layout=layout), layout)
    assert raw.skipped_lines == 2
    assert len(raw) == fx.ML_N_ROWS
    assert 4 not in raw.user and 5 not in raw.user


@pytest.mark.parametrize(
    "name,text",
    [
        ("lastfm.tsv", None),  # a LastFM-1K TSV
        ("notes.txt", "hello world\nthis is not a ratings file\n"),
        ("header.dat", "UserID::MovieID::Rating::Timestamp\n1::101::5::1000\n"),
        ("letters.dat", "a::b::c::d\n"),
    ],
)
def test_movielens_wrong_format_names_the_file(tmp_path: Path, name: str, text: str | None):
    path = fx.write_lastfm(tmp_path, name) if text is None else fx.write_text(tmp_path, name, text)
    with pytest.raises(SeqexpError, match="MovieLens") as info:
        read_movielens(path, "ratings_dat")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "layout,text",
    [
        ("u_data", "user\titem\trating\ttimestamp\n1\t101\t5\t1000\n"),  # a header
        ("u_data", "".join(line + "\n" for line in fx.ML_LINES)),  # ratings.dat lines
        ("u_data", "1,101,5,1000\n"),
        ("ratings_dat", "1\t101\t5\t1000\n"),
        ("ratings_csv", "".join(fx.movielens_line(line, "ratings_csv") + "\n"
                                for line in fx.ML_LINES)),  # no header
        ("ratings_csv", "user,item,rating,timestamp\n1,101,5,1000\n"),  # another header
        ("ratings_csv", "userId\tmovieId\trating\ttimestamp\n1\t101\t5\t1000\n"),
    ],
)
def test_movielens_layout_mismatch_names_the_file_and_layout(tmp_path: Path, layout: str,
                                                              text: str) -> None:
    path = fx.write_text(tmp_path, "ratings.txt", text)
    with pytest.raises(SeqexpError, match="MovieLens") as info:
        read_movielens(path, layout)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert LAYOUT_DESCRIPTIONS[layout] in message  # says which layout was expected


def test_movielens_csv_header_must_come_first(tmp_path: Path) -> None:
    path = fx.write_movielens(tmp_path, layout="ratings_csv", header=False)
    with pytest.raises(SeqexpError, match="header 'userId,movieId,rating,timestamp'"):
        read_movielens(path, "ratings_csv")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("text", ["", "\n\n"])
def test_movielens_empty_file(tmp_path: Path, text: str, layout: str) -> None:
    path = fx.write_text(tmp_path, "ratings.txt", text)
    with pytest.raises(SeqexpError) as info:
        read_movielens(path, layout)
    assert str(path) in str(info.value)


def test_movielens_single_colon_lines_are_not_ratings(tmp_path: Path) -> None:
    path = fx.write_text(tmp_path, "ratings.dat", "1:x:101:y:5:z:1000\n2:x:102:y:4:z:1001\n")
    with pytest.raises(SeqexpError):
        read_movielens(path, "ratings_dat")


@pytest.mark.parametrize("dataset", sorted(DATASET_LAYOUTS))
def test_movielens_dataset_configs_read_their_layout(tmp_path: Path, dataset: str) -> None:
    """conf/dataset/<name>.yaml with dataset.path on a file in that dataset's layout: the
    whole load path (reader chosen by format + layout, preprocessing, cache) gives the
    hand-ordered sequences; the file of another layout is refused."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "dataset" / f"{dataset}.yaml"))
    layout = DATASET_LAYOUTS[dataset]
    assert (cfg["format"], cfg["layout"]) == ("movielens", layout)
    assert cfg["archive_member"].endswith("/" + fx.ML_FILE_NAMES[layout])
    cfg["path"] = str(fx.write_movielens(tmp_path, layout=layout))
    data = load_dataset(cfg, USER_TAIL, tmp_path / "raw", tmp_path / "cache", progress=False)
    assert user_items(data, 0) == [4, 0, 1, 2, 5, 3, 0]
    assert data.stats["raw_events"] == fx.ML_N_ROWS
    other = next(name for name in LAYOUTS if name != layout)
    (tmp_path / "other").mkdir()
    cfg["path"] = str(fx.write_movielens(tmp_path / "other", layout=other))
    with pytest.raises(SeqexpError, match="MovieLens"):
        load_dataset(cfg, USER_TAIL, tmp_path / "raw", tmp_path / "cache", progress=False)


# ------------------------------------------------------------------------------ LastFM-1K
def test_lastfm_counts_and_skipped_lines(tmp_path: Path) -> None:
    raw = read_lastfm(fx.write_lastfm(tmp_path), item="track")
    assert len(raw) == fx.LASTFM_N_ROWS == 8
    assert len(np.unique(raw.user)) == fx.LASTFM_N_USERS == 2
    assert len(np.unique(raw.item)) == fx.LASTFM_N_TRACKS == 5
    assert raw.skipped_lines == fx.LASTFM_SKIPPED == 3
    assert raw.notes == {"lines_wrong_field_count": 1, "lines_not_utf8": 0,
                         "lines_bad_time_or_artist": 2}


def test_lastfm_rows_are_returned_oldest_first(tmp_path: Path) -> None:
    raw = read_lastfm(fx.write_lastfm(tmp_path), item="track")
    expected = fx.LASTFM_OLDEST_FIRST
    assert raw.timestamp.tolist() == [fx.iso_seconds(t) for _, t, _ in expected]
    assert raw.timestamp.dtype == np.int64
    assert first_occurrence_codes(raw.user.tolist()) == first_occurrence_codes(
        [u for u, _, _ in expected]
    )
    # Same track name by two artists = two items; quoted and unquoted names differ;
    # a row with an artist MBID and one without are the same item.
    assert first_occurrence_codes(raw.item.tolist()) == first_occurrence_codes(
        [track for _, _, track in expected]
    ) == [0, 1, 2, 0, 3, 2, 0, 4]


def test_lastfm_artist_items_merge_tracks(tmp_path: Path) -> None:
    raw = read_lastfm(fx.write_lastfm(tmp_path), item="artist")
    assert len(raw) == fx.LASTFM_N_ROWS
    assert len(np.unique(raw.item)) == fx.LASTFM_N_ARTISTS == 3
    artists = [track[0] for _, _, track in fx.LASTFM_OLDEST_FIRST]
    assert first_occurrence_codes(raw.item.tolist()) == first_occurrence_codes(artists)
    assert first_occurrence_codes(raw.item.tolist()) == [0, 1, 2, 0, 0, 2, 0, 1]
    assert raw.skipped_lines == 3


def test_lastfm_equal_timestamps_follow_listening_order(tmp_path: Path) -> None:
    raw = read_lastfm(fx.write_lastfm(tmp_path), item="track")
    data = preprocess(raw, {"name": "user_tail", "test_frac": 0.4, "val_frac": 0.0})
    # user_000001 (code 0): T2 T4 T3 T2 | T2 T1 -> test T2 T1; T1 is never trained: dropped.
    # user_000002 (code 1): T2 T5 | T3 -> test T3 (known from user 1's training part).
    # Reading the 23:05 tie in file order instead would give T2 T4 T2 | T3 T1.
    assert data.offsets.tolist() == [0, 4, 7]
    assert data.train_end.tolist() == [3, 6]
    assert data.val_end.tolist() == [3, 6]
    assert data.n_items == 4
    assert data.stats["test_oov_dropped"] == 1
    expected = fx.LASTFM_ORDERED[fx.U1][:4] + fx.LASTFM_ORDERED[fx.U2]
    assert first_occurrence_codes(data.items.tolist()) == first_occurrence_codes(expected)
    assert first_occurrence_codes(data.items.tolist()) == [0, 1, 2, 0, 0, 3, 2]
    tie = fx.iso_seconds("2009-05-04T23:05:00Z")
    assert data.timestamps[2] == data.timestamps[3] == tie


def test_lastfm_artist_sequences(tmp_path: Path) -> None:
    raw = read_lastfm(fx.write_lastfm(tmp_path), item="artist")
    data = preprocess(raw, {"name": "user_tail", "test_frac": 0.4, "val_frac": 0.0})
    # user 1: X X Y | X Band; user 2: X Band | Y. Every artist is trained on.
    assert data.offsets.tolist() == [0, 5, 8]
    assert data.train_end.tolist() == [3, 7]
    assert data.n_items == 3
    assert data.stats["test_oov_dropped"] == 0
    assert first_occurrence_codes(data.items.tolist()) == [0, 0, 1, 0, 2, 0, 2, 1]


@pytest.mark.parametrize("text", ["", "\n"])
def test_lastfm_empty_file(tmp_path: Path, text: str) -> None:
    path = fx.write_text(tmp_path, "listens.tsv", text)
    with pytest.raises(SeqexpError) as info:
        read_lastfm(path, item="track")
    assert str(path) in str(info.value)


def test_lastfm_only_bad_times_is_an_error(tmp_path: Path) -> None:
    path = fx.write_text(tmp_path, "listens.tsv", "u1\tyesterday\t\tA\t\tT\nu1\tnow\t\tB\t\tU\n")
    with pytest.raises(SeqexpError, match="LastFM-1K") as info:
        read_lastfm(path, item="track")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["movielens", "text"])
def test_lastfm_wrong_format_file_is_an_error(tmp_path: Path, kind: str) -> None:
    if kind == "movielens":
        path = fx.write_movielens(tmp_path)
    else:
        path = fx.write_text(tmp_path, "notes.txt", "hello world\nthis is not a TSV\n")
    with pytest.raises(SeqexpError) as info:
        read_lastfm(path, item="track")
    assert str(path) in str(info.value)


def test_lastfm_wrong_format_through_load_dataset_names_the_file(tmp_path: Path) -> None:
    path = fx.write_movielens(tmp_path)
    dataset = {"name": "lastfm", "format": "lastfm", "path": str(path), "item": "track",
               "min_item_support": 1, "drop_repeats": False}
    with pytest.raises(SeqexpError) as info:
        load_dataset(dataset, USER_TAIL, tmp_path / "raw", tmp_path / "cache")
    assert str(path) in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ------------------------------------------------------------------------------ tables
def _read(path: Path, sep: str | None = None):
    return read_table(path, sep=sep, **fx.TABLE_COLUMNS)


@pytest.mark.parametrize(
    "writer,timestamps",
    [
        (fx.write_csv, "iso"),
        (fx.write_csv, "numeric"),
        (fx.write_parquet, "iso"),
        (fx.write_parquet, "numeric"),
        (fx.write_parquet, "datetime"),
    ],
)
def test_table_custom_columns_and_timestamps(tmp_path: Path, writer, timestamps: str) -> None:
    raw = _read(writer(tmp_path, timestamps))
    assert len(raw) == 6
    assert raw.user.tolist() == fx.TABLE_USER_CODES
    assert raw.item.tolist() == fx.TABLE_ITEM_CODES
    assert raw.timestamp.tolist() == fx.TABLE_SECONDS
    assert raw.timestamp.tolist()[:3] == [1_577_836_800] * 3
    assert raw.timestamp.dtype == np.int64


def test_table_tsv_and_explicit_separator(tmp_path: Path) -> None:
    tsv = _read(fx.write_csv(tmp_path, "iso", name="events.tsv", sep="\t"))
    semi = _read(fx.write_csv(tmp_path, "numeric", name="events.txt", sep=";"), sep=";")
    for raw in (tsv, semi):
        assert raw.user.tolist() == fx.TABLE_USER_CODES
        assert raw.timestamp.tolist() == fx.TABLE_SECONDS


def test_table_ties_keep_row_order(tmp_path: Path) -> None:
    data = preprocess(_read(fx.write_csv(tmp_path)),
                           {"name": "user_tail", "test_frac": 0.34, "val_frac": 0.0})
    # alice: p1 p2 (a tie, kept in row order) | p3; bob (2 events: floor(0.68) = 0 test) and
    # carol (1 event) are all training.
    assert data.offsets.tolist() == [0, 3, 5, 6]
    assert data.train_end.tolist() == [2, 5, 6]
    assert data.items[:3].tolist() == [0, 1, 2]


@pytest.mark.parametrize("key", ["user_col", "item_col", "time_col"])
@pytest.mark.parametrize("writer", [fx.write_csv, fx.write_parquet])
def test_table_missing_column_names_the_key(tmp_path: Path, writer, key: str) -> None:
    path = writer(tmp_path)
    columns = dict(fx.TABLE_COLUMNS, **{key: "nope"})
    with pytest.raises(SeqexpError, match=rf"dataset\.{key}='nope'") as info:
        read_table(path, sep=None, **columns)
    assert str(path) in str(info.value)
    for other in set(fx.TABLE_COLUMNS) - {key}:
        assert f"dataset.{other}=" not in str(info.value)


def test_table_unparseable_times_name_time_col(tmp_path: Path) -> None:
    path = fx.write_text(tmp_path, "events.csv",
                         "visitor,product,seen_at\na,p1,yesterday\nb,p2,tomorrow\n")
    with pytest.raises(SeqexpError, match=r"dataset\.time_col") as info:
        _read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "visitor,product,seen_at\n"])
def test_table_empty_file(tmp_path: Path, text: str) -> None:
    path = fx.write_text(tmp_path, "events.csv", text)
    with pytest.raises(SeqexpError) as info:
        _read(path)
    assert str(path) in str(info.value)


def test_table_not_a_parquet_file(tmp_path: Path) -> None:
    path = fx.write_text(tmp_path, "events.parquet", "visitor,product,seen_at\na,p1,1\n")
    with pytest.raises(SeqexpError) as info:
        _read(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------ real-data script
def _real_data_check():
    spec = importlib.util.spec_from_file_location(
        "real_data_check", Path(__file__).resolve().parents[1] / "scripts" / "real_data_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_data_check_converts_recbole_inter_to_u_data(tmp_path: Path) -> None:
    script = _real_data_check()
    # RecBole's header, then u.data rows with float-typed timestamps as RecBole writes them.
    rows = [line.split("::") for line in fx.ML_LINES]
    inter = fx.write_text(tmp_path, "ml-100k.inter", script.INTER_HEADER + "\n" + "".join(
        "\t".join(row) + "\n" for row in rows))
    dest = tmp_path / "cache" / "u.data"
    assert script.inter_to_udata(inter, dest) == fx.ML_N_ROWS
    assert dest.read_text() == "".join("\t".join(row) + "\n" for row in rows)
    raw = read_movielens(dest, "u_data")
    assert raw.user.tolist() == [int(row[0]) for row in rows]
    assert raw.timestamp.tolist() == [int(row[3]) for row in rows]
    assert script.obtain_udata(dest) == dest  # a u.data is used as it is


def test_real_data_check_refuses_an_inter_file_without_its_header(tmp_path: Path) -> None:
    script = _real_data_check()
    inter = fx.write_text(tmp_path, "x.inter", "user_id\titem_id\trating\ttimestamp\n1\t2\t3\t4\n")
    with pytest.raises(SystemExit, match="RecBole header"):
        script.inter_to_udata(inter, tmp_path / "u.data")
    assert not (tmp_path / "u.data").exists()


def test_movielens_ids_are_labels_negative_and_huge_ones_included(tmp_path):
    from seqexp.data.interactions import raw_ids
    from seqexp.data.movielens import read_movielens

    path = tmp_path / "ratings.dat"
    path.write_text("-1::31::2::100\n-1::7::2::101\n1000000000000000::31::2::102\n")
    raw = read_movielens(path, "ratings_dat")
    assert raw.user.tolist() == [0, 0, 1] and raw.item.tolist() == [31, 7, 31]  # small: kept
    assert raw_ids(raw.user, raw.user_labels).tolist() == ["-1", "-1", "1000000000000000"]
    assert raw_ids(raw.item, raw.item_labels).tolist() == ["31", "7", "31"]
