"""Readers of raw interaction files.

Every reader takes a path plus its options and returns an :class:`Interactions` in file order.
Bad content fails with one ``HetCompError`` line naming the file and the line number. The
whitespace formats are parsed line by line in Python (about a second for a million ids),
which makes exact error positions free; the generic ``interactions`` reader uses pandas.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from hetcomp.errors import HetCompError


@dataclass
class Interactions:
    """Parallel arrays of (user, item) pairs in file order, with optional ratings/timestamps.

    Ids are ``int64``, except for the ``interactions`` reader's text ids (``object`` arrays).
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None = None
    timestamps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` from 1; an empty file is an error."""
    with open(path) as handle:
        text = handle.read()
    if not text.strip():
        raise HetCompError(f"{path}: empty file")
    return enumerate(text.splitlines(), start=1)


def _id(token: str, what: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise HetCompError(f"{where}: cannot parse {what} {token!r} as an integer") from None
    if value < 0:
        raise HetCompError(f"{where}: negative {what} {value}")
    return value


def _number(token: str, what: str, where: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise HetCompError(f"{where}: cannot parse {what} {token!r} as a number") from None


def _pack(users: list, items: list, ratings: list | None = None) -> Interactions:
    return Interactions(
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        ratings=None if ratings is None else np.asarray(ratings, dtype=np.float64),
    )


def read_citeulike(path: Path) -> Interactions:
    """``users.dat``: line index (from 0) = user id; first token = item count, then item ids."""
    users: list[int] = []
    items: list[int] = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        tokens = line.split()
        if not tokens:
            raise HetCompError(f"{where}: empty line (expected an item count)")
        count = _id(tokens[0], "item count", where)
        if count != len(tokens) - 1:
            raise HetCompError(
                f"{where}: count field says {count} items but {len(tokens) - 1} follow"
            )
        users.extend([lineno - 1] * count)
        items.extend(_id(token, "item id", where) for token in tokens[1:])
    return _pack(users, items)


def read_triples(path: Path, rating_threshold: float | None = None) -> Interactions:
    """``user item [rating]`` per line, whitespace-separated; keep ``rating >= rating_threshold``."""
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) == 2 and rating_threshold is not None:
            raise HetCompError(f"{where}: no rating column, but rating_threshold is set")
        if len(tokens) not in (2, 3):
            raise HetCompError(f"{where}: expected 'user item [rating]', got {len(tokens)} fields")
        rating = _number(tokens[2], "rating", where) if len(tokens) == 3 else 1.0
        if rating_threshold is not None and rating < rating_threshold:
            continue
        users.append(_id(tokens[0], "user id", where))
        items.append(_id(tokens[1], "item id", where))
        ratings.append(rating)
    return _pack(users, items, ratings)


def read_tsv_counts(path: Path, min_count: int = 1) -> Interactions:
    """``user<TAB>item<TAB>count`` per line; keep ``count >= min_count`` (returned as ratings)."""
    users: list[int] = []
    items: list[int] = []
    counts: list[int] = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise HetCompError(f"{where}: expected 'user<TAB>item<TAB>count', got {len(fields)} fields")
        count = _id(fields[2], "count", where)
        if count < min_count:
            continue
        users.append(_id(fields[0], "user id", where))
        items.append(_id(fields[1], "item id", where))
        counts.append(count)
    return _pack(users, items, counts)


def read_adjacency(path: Path) -> Interactions:
    """LightGCN format: ``user item item ...`` per line (a user may have no items)."""
    users: list[int] = []
    items: list[int] = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        tokens = line.split()
        if not tokens:
            continue
        user = _id(tokens[0], "user id", where)
        users.extend([user] * (len(tokens) - 1))
        items.extend(_id(token, "item id", where) for token in tokens[1:])
    return _pack(users, items)


def read_interactions(
    path: Path,
    sep: str = ",",
    header: bool = True,
    user_col: str | int = 0,
    item_col: str | int = 1,
    rating_col: str | int | None = None,
    rating_threshold: float | None = None,
    timestamp_col: str | int | None = None,
) -> Interactions:
    """Generic CSV/TSV: columns by header name or 0-based index.

    Integer id columns are returned as integers (negative ids are errors); any other id column
    (e.g. Amazon's string ids) as text, which ``hetcomp prepare`` maps to 0, 1, ... over all the
    dataset's files. ``timestamp_col`` (numbers, e.g. Unix seconds) is used by the ``temporal``
    split.
    """
    if rating_threshold is not None and rating_col is None:
        raise HetCompError(f"{path}: rating_threshold is set but rating_col is not")
    try:
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=str,
                            skip_blank_lines=False, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise HetCompError(f"{path}: empty file") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise HetCompError(f"{path}: cannot parse ({str(exc).strip().splitlines()[-1]})") from None
    if frame.empty:
        raise HetCompError(f"{path}: empty file")
    first_line = 2 if header else 1

    def column(spec: str | int, what: str) -> pd.Series:
        if isinstance(spec, int) and 0 <= spec < frame.shape[1]:
            return frame.iloc[:, spec]
        if isinstance(spec, str) and spec in frame.columns:
            return frame[spec]
        known = ", ".join(map(str, frame.columns)) if header else f"0..{frame.shape[1] - 1}"
        raise HetCompError(f"{path}: no {what} column {spec!r} (columns: {known})")

    def numeric(spec: str | int, what: str) -> np.ndarray:
        raw = column(spec, what).fillna("").str.strip()
        values = pd.to_numeric(raw, errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            raise HetCompError(f"{path}:{bad[0] + first_line}: cannot parse {what} "
                               f"{raw.iloc[bad[0]]!r} as a number")
        return values.to_numpy(dtype=np.float64)

    def ids(spec: str | int, what: str) -> np.ndarray:
        raw = column(spec, what).fillna("").str.strip()
        empty = np.flatnonzero((raw == "").to_numpy())
        if len(empty):
            raise HetCompError(f"{path}:{empty[0] + first_line}: missing {what}")
        if raw.str.fullmatch(r"-?\d+").all():
            values = raw.astype(np.int64).to_numpy()
            negative = np.flatnonzero(values < 0)
            if len(negative):
                raise HetCompError(f"{path}:{negative[0] + first_line}: negative {what} "
                                   f"{values[negative[0]]}")
            return values
        return raw.to_numpy(dtype=object)

    result = Interactions(users=ids(user_col, "user id"), items=ids(item_col, "item id"))
    if rating_col is not None:
        result.ratings = numeric(rating_col, "rating")
    if timestamp_col is not None:
        result.timestamps = numeric(timestamp_col, "timestamp")
    if rating_threshold is not None:
        keep = result.ratings >= rating_threshold
        result = Interactions(*(None if a is None else a[keep] for a in
                                (result.users, result.items, result.ratings, result.timestamps)))
    return result


READERS: dict[str, Callable[..., Interactions]] = {
    "citeulike": read_citeulike,
    "triples": read_triples,
    "tsv_counts": read_tsv_counts,
    "adjacency": read_adjacency,
    "interactions": read_interactions,
}


def check_options(reader: str, options: dict) -> None:
    """Fail on an unknown reader name or an option the reader does not take."""
    if reader not in READERS:
        raise HetCompError(f"unknown reader {reader!r}; known: {', '.join(sorted(READERS))}")
    allowed = list(inspect.signature(READERS[reader]).parameters)[1:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HetCompError(f"reader {reader!r}: unknown option(s) {', '.join(unknown)}; "
                           f"allowed: {', '.join(allowed) or 'none'}")


def read(reader: str, path: str | Path, options: dict | None = None) -> Interactions:
    """Run the reader called ``reader`` on ``path`` with ``options``."""
    check_options(reader, options or {})
    path = Path(path)
    if not path.is_file():
        raise HetCompError(f"{path}: file not found")
    return READERS[reader](path, **(options or {}))
