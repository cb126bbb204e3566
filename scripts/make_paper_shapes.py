"""Write made-up raw files with the shapes of the paper's datasets, in their exact raw formats.

Usage: python scripts/make_paper_shapes.py DIR [--shapes ml10m lastfm] [--scale F] [--seed S]

- `DIR/ml10m/ratings.dat`: ML-10M's `UserID::MovieID::Rating::Timestamp` layout with its counts
  (10,000,054 ratings, 69,878 users, 10,677 movies, every user >= 20 ratings, heavy-tailed user
  counts, Zipf-like movie popularity, many equal timestamps within a user, half-star ratings).
- `DIR/lastfm/userid-timestamp-artid-artname-traid-traname.tsv`: Celma's LastFM-1K layout (TAB,
  no header, ISO-8601 UTC times, each user's rows newest-first) with the real file's shape:
  19,150,868 lines, 992 users whose counts run from tens to ~180,000 (log-normal), ~1.07M
  distinct tracks with Zipf-like popularity (445k with >= 5 training listens), tracks repeated
  within a user's recent listening, sessions of songs minutes apart separated by hours,
  artist and track MusicBrainz ids missing for part of the artists and tracks, names with quotes,
  apostrophes and non-Latin letters, track names shared by several artists, and a few malformed
  lines of each kind the reader skips (wrong field count, bad time, empty artist, a stray
  Latin-1 byte).

Nothing here comes from the real data. Generation is vectorised numpy, deterministic from the
seed, and written in chunks of users (memory bounded by a chunk, not by the file). `--scale`
shrinks row, user and track counts together (for tests). Prints and returns what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LASTFM_FILE = "userid-timestamp-artid-artname-traid-traname.tsv"
ML10M_FILE = "ratings.dat"

# ---------------------------------------------------------------------------------- ML-10M
MIN_PER_USER = 20
# ML-10M's rating distribution over 0.5, 1.0, ..., 5.0 (half stars are rarer).
RATINGS = ["0.5", "1", "1.5", "2", "2.5", "3", "3.5", "4", "4.5", "5"]
RATING_P = np.array([0.9, 3.8, 1.2, 7.9, 3.7, 23.6, 8.8, 28.8, 7.6, 13.6])
T_MIN, T_MAX = 789_652_009, 1_231_131_736  # ML-10M's first and last timestamps
CHUNK_ROWS = 1 << 20


def user_counts(rng: np.random.Generator, lines: int, users: int) -> np.ndarray:
    """Ratings per user: MIN_PER_USER each plus a heavy-tailed share of the rest, summing to
    exactly `lines`."""
    weights = rng.lognormal(mean=0.0, sigma=1.3, size=users)
    extra = rng.multinomial(lines - MIN_PER_USER * users, weights / weights.sum())
    return MIN_PER_USER + extra


def write_joined(handle, columns: list[pa.Array], separator: str) -> int:
    """Write the rows of `columns` (strings) joined by `separator`, one line each; bytes written."""
    joined = pc.binary_join_element_wise(*columns, separator)
    joined = pc.binary_join_element_wise(joined, "", "\n")  # "line" + "\n" + ""
    joined = pa.concat_arrays([joined]) if isinstance(joined, pa.ChunkedArray) else joined
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:]
    begin, end = int(offsets[0]), int(offsets[len(joined)])
    handle.write(memoryview(joined.buffers()[2])[begin:end])
    return end - begin


def write_ml10m(path: Path, lines: int, users: int, items: int, seed: int) -> dict:
    """Write a ratings.dat with exactly `lines` lines; vectorised, deterministic from `seed`.

    The draws are whole-file arrays (ten int64 columns at ML-10M's size); the text is formatted
    and written CHUNK_ROWS lines at a time.
    """
    rng = np.random.default_rng(seed)
    counts = user_counts(rng, lines, users)
    # Sparse ids like the real file (user ids up to 71567, movie ids up to 65133).
    user_ids = np.sort(rng.choice(int(users * 1.03) + 1, size=users, replace=False)) + 1
    item_ids = rng.choice(int(items * 6.1) + 1, size=items, replace=False) + 1
    user_of = np.repeat(np.arange(users), counts)

    # Zipf-like popularity: the r-th most popular item has weight 1 / (r + 10) ** 1.1.
    popularity = 1.0 / (np.arange(items) + 10.0) ** 1.1
    item = item_ids[rng.choice(items, size=lines, p=popularity / popularity.sum())]
    rating = rng.choice(len(RATINGS), size=lines, p=RATING_P / RATING_P.sum())

    # Timestamps: each user starts somewhere in the window and rates in bursts; 60% of steps
    # add 0 seconds, so a user has many equal timestamps (as when rating a batch at once).
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    gap = rng.exponential(4000.0, size=lines).astype(np.int64)
    step = np.where(rng.random(lines) < 0.6, 0, gap)
    step[starts] = 0
    elapsed = np.cumsum(step)
    elapsed -= np.repeat(elapsed[starts], counts)
    room = np.maximum(T_MAX - T_MIN - elapsed[starts + counts - 1], 1)
    first = T_MIN + (rng.random(users) * room).astype(np.int64)
    timestamp = np.repeat(first, counts) + elapsed
    del gap, step, elapsed
    # The file lists a user's ratings together but not in time order (ML-10M sorts by movie id).
    order = np.lexsort((item, user_of))
    rating_text = pa.array(RATINGS, pa.string())
    written = 0
    with open(path, "wb") as handle:
        for begin in range(0, lines, CHUNK_ROWS):
            rows = order[begin:begin + CHUNK_ROWS]
            written += write_joined(handle, [
                pc.cast(pa.array(user_ids[user_of[rows]]), pa.string()),
                pc.cast(pa.array(item[rows]), pa.string()),
                rating_text.take(pa.array(rating[rows])),
                pc.cast(pa.array(timestamp[rows]), pa.string()),
            ], "::")
    return {"lines": lines, "users": users, "distinct_items": int(len(np.unique(item))),
            "bytes": written}


# ---------------------------------------------------------------------------------- LastFM-1K
LASTFM_T0 = 1_108_296_000  # 2005-02-13, near the real log's first listen
LASTFM_T1 = 1_241_136_000  # 2009-05-01, near its last
ODD_ARTISTS = ["Sigur Rós", "Мумий Тролль", "Beyoncé", "AC/DC", '"Weird Al" Yankovic',
               "Guns N' Roses", "東京事変", "Mötley Crüe", "Florence + The Machine", "!!!"]
# Titles j < len(SHARED_TITLES) of every fourth artist: same track name, another item.
SHARED_TITLES = ["Intro", "Untitled", '"Heroes"', 'Don\'t Stop "Me" Now', "Ágætis byrjun",
                 "Интро", "#1", "Hey Jude (Live)"]
TITLE_WORDS = ["Song", "Love", "Night", "Track", "Ça plane", "Sommer", "夜", "Reprise",
               "Rock 'n' Roll", "Blue"]
BAD_KINDS = ("wrong_field_count", "bad_time", "no_artist", "not_utf8")


@dataclass(frozen=True)
class LastfmShape:
    """The knobs of the LastFM-1K-shaped log; the defaults give the real file's shape."""

    lines: int = 19_150_868
    users: int = 992
    user_sigma: float = 1.45  # log-normal spread of listens per user
    max_per_user: int = 183_000
    min_per_user: int = 20
    tracks: int = 1_135_000  # candidate tracks; ~1.07M of them are drawn
    artists: int = 170_000
    zipf_s: float = 0.935  # the r-th most popular track has weight 1 / (r + zipf_r0) ** zipf_s
    zipf_r0: float = 50.0
    repeat_p: float = 0.35  # a listen repeats one of the user's last repeat_window tracks
    repeat_window: int = 30
    session_break_p: float = 1 / 14  # per listen: the next one starts a new session
    same_second_p: float = 0.002  # two listens logged in the same second
    bad_every: int = 1_000_000  # one malformed line per this many (kinds in turn)

    def scaled(self, scale: float) -> LastfmShape:
        """Rows, users, tracks and artists times `scale` (at least a few of each)."""
        users = max(4, round(self.users * scale))
        lines = max(users * self.min_per_user * 2, round(self.lines * scale))
        return LastfmShape(**{**asdict(self), "lines": lines, "users": users,
                              "max_per_user": max(round(self.max_per_user * scale),
                                                  2 * -(-lines // users)),
                              "tracks": max(50, round(self.tracks * scale)),
                              "artists": max(10, round(self.artists * scale)),
                              "bad_every": max(50, round(self.bad_every * scale))})


def lastfm_user_counts(rng: np.random.Generator, shape: LastfmShape) -> np.ndarray:
    """Listens per user: log-normal, clipped to [min_per_user, max_per_user], summing exactly
    to `shape.lines`."""
    weights = rng.lognormal(0.0, shape.user_sigma, shape.users)

    def counts_at(scale: float) -> np.ndarray:
        return np.clip(np.floor(weights * scale), shape.min_per_user,
                       shape.max_per_user).astype(np.int64)

    low, high = 0.0, shape.lines / weights.min()
    for _ in range(100):  # bisection on the scale that makes the clipped counts add up
        middle = (low + high) / 2
        low, high = (middle, high) if counts_at(middle).sum() < shape.lines else (low, middle)
    counts = counts_at(low)
    short = shape.lines - int(counts.sum())  # >= 0: hand the remainder out one by one
    room = np.flatnonzero(counts < shape.max_per_user)
    np.add.at(counts, rng.choice(room, size=short, replace=short > len(room)), 1)
    return counts


def track_sampler(shape: LastfmShape) -> np.ndarray:
    """The cumulative popularity of the candidate tracks, most popular first."""
    weight = 1.0 / (np.arange(shape.tracks) + shape.zipf_r0) ** shape.zipf_s
    cumulative = np.cumsum(weight)
    return cumulative / cumulative[-1]


def track_identity(rank: np.ndarray, shape: LastfmShape) -> np.ndarray:
    """A fixed shuffle of popularity ranks to track ids (multiplication by a unit mod tracks),
    so that artist and title (drawn from the id) do not follow popularity."""
    unit = 1_000_003 if np.gcd(1_000_003, shape.tracks) == 1 else 1
    return (rank.astype(np.int64) * unit) % shape.tracks


def _labelled(prefixes: list[str], which: np.ndarray, number: np.ndarray) -> pa.Array:
    """`prefixes[which] + " " + number` as strings."""
    return pc.binary_join_element_wise(pa.array(prefixes).take(pa.array(which)),
                                       pc.cast(pa.array(number), pa.string()), " ")


def _mbid(number: np.ndarray, salt: int, present: np.ndarray) -> pa.Array:
    """UUID-shaped ids made from `number` (decimal digits are hex digits), "" where absent."""
    digits = pc.utf8_lpad(pc.cast(pa.array((number * 7919 + salt) % 10**12), pa.string()), 12, "0")
    uuid = pc.binary_join_element_wise(f"{salt:08d}-0000-4000-8000-", digits, "")
    return pc.if_else(pa.array(present), uuid, "")


def lastfm_columns(user_label: pa.Array, seconds: np.ndarray, track: np.ndarray,
                   shape: LastfmShape) -> list[pa.Array]:
    """The six TSV columns of listens of `track` at `seconds` by `user_label`."""
    artist, title = track % shape.artists, track // shape.artists
    odd_artist = artist % 23 == 7
    artist_name = _labelled(["Artist", *ODD_ARTISTS], np.where(
        odd_artist, 1 + artist % len(ODD_ARTISTS), 0), artist)
    # A quarter of the artists have tracks named from SHARED_TITLES; the rest are unique names.
    shared = (title < len(SHARED_TITLES)) & (artist % 4 == 0)
    word = _labelled(TITLE_WORDS, track % len(TITLE_WORDS), track)
    track_name = pc.if_else(pa.array(shared), pa.array(SHARED_TITLES).take(
        pa.array(np.minimum(title, len(SHARED_TITLES) - 1))), word)
    time_text = pc.strftime(pa.array(seconds.astype("datetime64[s]")),
                            format="%Y-%m-%dT%H:%M:%SZ")
    return [user_label, time_text, _mbid(artist, 1, artist % 10 != 3), artist_name,
            _mbid(track, 2, track % 9 != 4), track_name]


def listening_times(rng: np.random.Generator, counts: np.ndarray,
                    shape: LastfmShape) -> np.ndarray:
    """Seconds of each listen, users one after another, oldest first: songs 2.5-6 minutes
    apart within a session, sessions hours apart, each user's span somewhere in the window."""
    n = int(counts.sum())
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(len(counts)), counts)
    gap = rng.uniform(150, 360, n)
    gap[rng.random(n) < shape.same_second_p] = 0
    brk = rng.random(n) < shape.session_break_p
    # Session breaks share what is left of a user's span: exponential, mean at least an hour.
    span = (LASTFM_T1 - LASTFM_T0) * rng.uniform(0.15, 0.95, len(counts))
    busy = np.bincount(owner, gap, len(counts))
    breaks = np.maximum(np.bincount(owner, brk, len(counts)), 1)
    mean_break = np.maximum((span - busy) / breaks, 3600.0)
    gap = np.where(brk, rng.exponential(1.0, n) * mean_break[owner], gap)
    gap[first] = 0
    elapsed = np.cumsum(gap)
    elapsed -= np.repeat(elapsed[first], counts)
    total = elapsed[first + counts - 1]
    start = LASTFM_T0 + rng.random(len(counts)) * np.maximum(LASTFM_T1 - LASTFM_T0 - total, 0)
    return (np.repeat(start, counts) + elapsed).astype(np.int64)


def listened_tracks(rng: np.random.Generator, counts: np.ndarray, cumulative: np.ndarray,
                    shape: LastfmShape) -> np.ndarray:
    """Track ids of each listen, users one after another: Zipf draws, a share of them replaced
    by a repeat of one of the user's last `repeat_window` draws."""
    n = int(counts.sum())
    rank = np.searchsorted(cumulative, rng.random(n), side="right")
    track = track_identity(np.minimum(rank, shape.tracks - 1), shape)
    position = np.arange(n) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    back = rng.integers(1, shape.repeat_window + 1, n)
    repeat = (rng.random(n) < shape.repeat_p) & (back <= position)
    source = np.flatnonzero(repeat)
    track[source] = track[source - back[source]]
    return track


def _corrupt(line: str, kind: str) -> bytes:
    """One malformed line of `kind` made from a good one."""
    fields = line.split("\t")
    if kind == "wrong_field_count":
        return "\t".join(fields[:3]).encode() + b"\n"
    if kind == "bad_time":
        fields[1] = fields[1].replace("T", " ").rstrip("Z")
    elif kind == "no_artist":
        fields[3] = ""
    else:  # not_utf8: a Latin-1 e-acute in the track name
        return "\t".join(fields).encode() + b"\xe9\n"
    return "\t".join(fields).encode() + b"\n"


def write_lastfm_chunk(handle, rng: np.random.Generator, labels: pa.Array, counts: np.ndarray,
                       cumulative: np.ndarray, shape: LastfmShape, row0: int) -> dict:
    """Write the listens of one chunk of users, each user's newest first; what was written."""
    seconds = listening_times(rng, counts, shape)
    track = listened_tracks(rng, counts, cumulative, shape)
    ends = np.cumsum(counts)
    owner = np.repeat(np.arange(len(counts)), counts)
    newest_first = np.repeat(ends - 1, counts) - (np.arange(len(seconds)) - (ends - counts)[owner])
    seconds, track = seconds[newest_first], track[newest_first]
    columns = lastfm_columns(labels.take(pa.array(owner)), seconds, track, shape)
    lines = pc.binary_join_element_wise(*columns, "\t")
    bad_at = np.flatnonzero((row0 + np.arange(len(track)) + 1) % shape.bad_every == 0)
    kinds = [BAD_KINDS[((row0 + i + 1) // shape.bad_every - 1) % len(BAD_KINDS)] for i in bad_at]
    written, done = 0, 0
    for at, kind in zip(bad_at.tolist(), kinds, strict=True):
        if at > done:
            written += write_joined(handle, [lines.slice(done, at - done)], "")
        bad = _corrupt(lines[at].as_py(), kind)
        handle.write(bad)
        written, done = written + len(bad), at + 1
    if done < len(track):
        written += write_joined(handle, [lines.slice(done)], "")
    good = np.ones(len(track), dtype=bool)
    good[bad_at] = False
    return {"bytes": written, "bad": kinds, "good_tracks": np.unique(track[good]),
            "good_per_user": np.bincount(owner[good], minlength=len(counts))}


def write_lastfm(path: Path, shape: LastfmShape, seed: int, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Write the LastFM-1K-shaped TSV, users in chunks of about `chunk_rows` listens."""
    rng = np.random.default_rng((seed, 0))
    counts = lastfm_user_counts(rng, shape)
    ids = np.sort(rng.choice(max(1000, shape.users), size=shape.users, replace=False)) + 1
    labels = pc.binary_join_element_wise("user", pc.utf8_lpad(
        pc.cast(pa.array(ids), pa.string()), 6, "0"), "_")
    cumulative = track_sampler(shape)
    first_row = np.cumsum(counts) - counts
    chunk_of_user = first_row // chunk_rows
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of_user)) + 1, [shape.users]])
    tracks, good_per_user, bad, written = [], [], [], 0
    with open(path, "wb") as handle:
        for chunk, (lo, hi) in enumerate(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)):
            done = write_lastfm_chunk(handle, np.random.default_rng((seed, 1 + chunk)),
                                      labels.slice(lo, hi - lo), counts[lo:hi], cumulative,
                                      shape, int(first_row[lo]))
            written += done["bytes"]
            bad += done["bad"]
            tracks.append(done["good_tracks"])
            good_per_user.append(done["good_per_user"])
    per_user = np.concatenate(good_per_user)
    return {"lines": shape.lines, "users": shape.users, "bytes": written,
            "valid_rows": shape.lines - len(bad),
            "distinct_tracks": int(len(np.unique(np.concatenate(tracks)))),
            "malformed": {kind: bad.count(kind) for kind in BAD_KINDS},
            "user_min": int(per_user.min()), "user_median": int(np.median(per_user)),
            "user_max": int(per_user.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the files go (outside the repository)")
    parser.add_argument("--shapes", nargs="+", choices=["ml10m", "lastfm"],
                        default=["ml10m", "lastfm"])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="rows, users and items times this (1 = the real files' counts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    summary = {}
    for shape in args.shapes:
        folder = args.folder / shape
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if shape == "ml10m":
            users = max(4, round(69_878 * args.scale))
            path = folder / ML10M_FILE
            facts = write_ml10m(path, max(round(10_000_054 * args.scale), MIN_PER_USER * users),
                                users, max(10, round(10_677 * args.scale)), args.seed)
        else:
            path = folder / LASTFM_FILE
            facts = write_lastfm(path, LastfmShape().scaled(args.scale), args.seed)
        facts.update(path=str(path), seconds=round(time.perf_counter() - started, 1))
        print(f"{shape}: {json.dumps(facts)}", flush=True)
        summary[shape] = facts
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
