"""Writers of small, made-up raw files in the exact formats the readers parse.

Nothing here comes from the real MovieLens or Last.fm data. Every writer takes a folder, writes
one file into it and returns its path; the module constants hold the hand-counted facts the
tests assert against.
"""

from __future__ import annotations

import calendar
from pathlib import Path

import pandas as pd

# --------------------------------------------------------------------------------------------
# MovieLens ratings.dat: UserID::MovieID::Rating::Timestamp
# --------------------------------------------------------------------------------------------
# User 1 appears in two non-contiguous blocks; users 1, 2 and 3 each have several ratings with
# the same timestamp, whose order must stay the file order. Ratings include halves (4.5).
ML_LINES = [
    "1::101::5::1000",
    "1::102::4.5::1000",
    "1::103::3::1000",
    "1::104::4::1010",
    "2::101::4::900",
    "2::105::2.5::900",
    "2::102::1::910",
    "2::103::3::920",
    "2::104::5::930",
    "1::105::4::995",  # second block of user 1, earlier than its first block
    "1::106::3::1000",  # ties with 101, 102, 103 of user 1 and comes after them in the file
    "1::101::2::1020",
    "3::102::5::500",
    "3::101::4::500",
    "3::103::3::500",
    "3::104::2::600",
    "3::105::1::700",
]
ML_N_ROWS = 17
ML_N_USERS = 3
ML_N_ITEMS = 6  # movies 101..106
# Each user's movies ordered by (timestamp, file order): the hand-computed listening order.
ML_ORDERED = {
    1: [105, 101, 102, 103, 106, 104, 101],
    2: [101, 105, 102, 103, 104],
    3: [102, 101, 103, 104, 105],
}


# The same ratings in the other GroupLens layouts: ML-100K u.data (TAB, no header) and ML-20M
# ratings.csv (comma, under this header line).
ML_SEPARATORS = {"ratings_dat": "::", "u_data": "\t", "ratings_csv": ","}
ML20M_HEADER = "userId,movieId,rating,timestamp"
ML_FILE_NAMES = {"ratings_dat": "ratings.dat", "u_data": "u.data", "ratings_csv": "ratings.csv"}


def movielens_line(line: str, layout: str) -> str:
    """A `u::i::r::t` line (or a malformed one) in `layout`: every `::` becomes its separator."""
    return line.replace("::", ML_SEPARATORS[layout])


def write_movielens(
    folder: Path,
    name: str | None = None,
    lines: list[str] | None = None,
    newline: str = "\n",
    layout: str = "ratings_dat",
    header: bool = True,
) -> Path:
    """ML_LINES (or `lines`, written with `::`) in `layout`, each line ended by `newline`;
    ratings_csv files start with ML20M_HEADER unless `header` is false."""
    path = Path(folder) / (name or ML_FILE_NAMES[layout])
    rows = [movielens_line(line, layout) for line in (ML_LINES if lines is None else lines)]
    if layout == "ratings_csv" and header:
        rows.insert(0, ML20M_HEADER)
    path.write_bytes("".join(row + newline for row in rows).encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------
# LastFM-1K: userid \t timestamp \t artid \t artname \t traid \t traname, newest-first per user
# --------------------------------------------------------------------------------------------
def iso_seconds(text: str) -> int:
    """Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` time, computed without pyarrow."""
    return calendar.timegm(
        (int(text[0:4]), int(text[5:7]), int(text[8:10]),
         int(text[11:13]), int(text[14:16]), int(text[17:19]), 0, 0, 0)
    )


U1, U2 = "user_000001", "user_000002"
# Tracks (artist name, track name): the items of item="track".
T1 = ("The Band", '"Heroes"')  # quotes around the whole name must stay part of the name
T2 = ("Artist X", "Same Name")
T3 = ("Artist Y", "Same Name")  # same track name as T2, other artist: another item
T4 = ("Artist X", 'Don\'t Stop "Me" Now')
T5 = ("The Band", "Heroes")  # differs from T1 only by the quotes

# (userid, timestamp, artid, artname, traid, traname) rows, or a raw line for malformed ones.
LASTFM_ROWS: list[tuple[str, ...] | str] = [
    (U1, "2009-05-04T23:10:00Z", "", T1[0], "", T1[1]),
    (U1, "2009-05-04T23:05:00Z", "0a1b2c3d-0000-0000-0000-00000000000x", T2[0], "", T2[1]),
    (U1, "2009-05-04T23:05:00Z", "", T3[0], "", T3[1]),  # same time: listened BEFORE the above
    (U1, "2009-05-04T23:00:00Z", "", T4[0], "9f8e7d6c-0000-0000-0000-000000000004", T4[1]),
    (U1, "2009-05-04 22:55:00", "", T2[0], "", T2[1]),  # bad timestamp -> skipped
    (U1, "2009-05-04T22:50:00Z", "", T2[0], "", T2[1]),  # no artist MBID, same item as above
    (U2, "2009-05-05T10:00:00Z", "", T3[0], "", T3[1]),
    f"{U2}\t2009-05-05T09:30:00Z\tArtist Y",  # wrong field count (3) -> skipped
    (U2, "2009-05-05T09:00:00Z", "", T5[0], "", T5[1]),
    (U2, "2009-05-05T08:30:00Z", "", "", "", "Untitled"),  # no artist -> skipped
    (U2, "2009-05-05T08:00:00Z", "", T2[0], "", T2[1]),
]
LASTFM_N_LINES = 11
LASTFM_N_ROWS = 8  # valid listening events
LASTFM_N_USERS = 2
LASTFM_N_TRACKS = 5  # T1..T5
LASTFM_N_ARTISTS = 3  # The Band, Artist X, Artist Y
LASTFM_WRONG_FIELD_COUNT = 1
LASTFM_BAD_TIME_OR_ARTIST = 2
LASTFM_SKIPPED = LASTFM_WRONG_FIELD_COUNT + LASTFM_BAD_TIME_OR_ARTIST
# Listening order (oldest first) of each user's valid events.
LASTFM_ORDERED = {
    U1: [T2, T4, T3, T2, T1],
    U2: [T2, T5, T3],
}
# The valid rows in the order read_lastfm must return them: the file reversed.
LASTFM_OLDEST_FIRST = [
    (U2, "2009-05-05T08:00:00Z", T2),
    (U2, "2009-05-05T09:00:00Z", T5),
    (U2, "2009-05-05T10:00:00Z", T3),
    (U1, "2009-05-04T22:50:00Z", T2),
    (U1, "2009-05-04T23:00:00Z", T4),
    (U1, "2009-05-04T23:05:00Z", T3),
    (U1, "2009-05-04T23:05:00Z", T2),
    (U1, "2009-05-04T23:10:00Z", T1),
]


def write_lastfm(
    folder: Path, name: str = "userid-timestamp-artid-artname-traid-traname.tsv"
) -> Path:
    """The LastFM-1K TSV of LASTFM_ROWS: no header, TAB separated, newest-first per user."""
    path = Path(folder) / name
    lines = [row if isinstance(row, str) else "\t".join(row) for row in LASTFM_ROWS]
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------
# CSV / Parquet with custom column names
# --------------------------------------------------------------------------------------------
TABLE_COLUMNS = {"user_col": "visitor", "item_col": "product", "time_col": "seen_at"}
_T0 = iso_seconds("2020-01-01T00:00:00Z")
# (visitor, product, ISO time, seconds since the epoch)
TABLE_ROWS = [
    ("alice", "p1", "2020-01-01T00:00:00Z", _T0),
    ("alice", "p2", "2020-01-01T00:00:00Z", _T0),  # tie with the row above
    ("bob", "p1", "2020-01-01T01:00:00+01:00", _T0),  # an explicit offset: the same instant
    ("alice", "p3", "2020-01-01T00:00:30Z", _T0 + 30),
    ("carol", "p2", "2020-01-02T00:00:00Z", _T0 + 86_400),
    ("bob", "p3", "2020-01-01T12:00:00Z", _T0 + 43_200),
]
TABLE_USER_CODES = [0, 0, 1, 0, 2, 1]  # first-appearance codes of alice, bob, carol
TABLE_ITEM_CODES = [0, 1, 0, 2, 1, 2]  # p1, p2, p3
TABLE_SECONDS = [row[3] for row in TABLE_ROWS]


def table_frame(timestamps: str = "iso") -> pd.DataFrame:
    """TABLE_ROWS as a frame with the custom column names; timestamps "iso" (strings),
    "numeric" (int seconds) or "datetime" (a tz-aware datetime column)."""
    if timestamps == "iso":
        times: object = [row[2] for row in TABLE_ROWS]
    elif timestamps == "numeric":
        times = TABLE_SECONDS
    elif timestamps == "datetime":
        times = pd.to_datetime([row[2] for row in TABLE_ROWS], utc=True, format="ISO8601")
    else:
        raise ValueError(timestamps)
    return pd.DataFrame({
        TABLE_COLUMNS["user_col"]: [row[0] for row in TABLE_ROWS],
        TABLE_COLUMNS["item_col"]: [row[1] for row in TABLE_ROWS],
        TABLE_COLUMNS["time_col"]: times,
    })


def write_csv(
    folder: Path, timestamps: str = "iso", name: str | None = None, sep: str = ","
) -> Path:
    path = Path(folder) / (name or f"events-{timestamps}.csv")
    table_frame(timestamps).to_csv(path, index=False, sep=sep)
    return path


def write_parquet(folder: Path, timestamps: str = "iso", name: str | None = None) -> Path:
    path = Path(folder) / (name or f"events-{timestamps}.parquet")
    table_frame(timestamps).to_parquet(path, index=False)
    return path


def write_text(folder: Path, name: str, text: str) -> Path:
    """Any other file (wrong formats, empty files)."""
    path = Path(folder) / name
    path.write_bytes(text.encode("utf-8"))
    return path
