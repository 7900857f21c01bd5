"""Interaction logs: reading a MovieLens folder or a CSV/Parquet event log into one typed form.

Two input formats share one in-memory form, InteractionLog:
- a MovieLens folder (ratings.csv `userId,movieId,rating,timestamp` + movies.csv genres `A|B`);
- a generic log, CSV or Parquet, with columns `user_id,item_id,timestamp`, optional `category`
  (multi-valued `A|B`), optional `rating` or `label` (0/1), optional behaviour type (a column
  named by `behavior_column`, e.g. pv/cart/fav/buy), and any extra columns named as user profile
  or request context features. Columns the reader was not asked to use are listed in
  InteractionLog.ignored_columns, so that a caller can say so.

Behaviours (the events a history is made of) are every rated event for rating logs (a rating
means the user watched the movie), label-1 events for labelled logs (a shown-but-not-clicked
impression is not a behaviour), and every event for implicit logs; with a behaviour-type column,
only the events of the chosen types. InteractionLog.histories()
groups them per user, newest first: what `dinserve history load` writes to Redis, and the same
behaviours training builds its samples from.

Owned by the online side because the history loader reads it; torch-free (numpy + csv; pyarrow
only for Parquet).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

FORMATS: tuple[str, ...] = ("auto", "movielens", "csv", "parquet")
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, "category", "rating", "label")
CATEGORY_SEPARATOR = "|"
MOVIELENS_NO_GENRE = "(no genres listed)"



@dataclass
class UserHistory:
    """One user's behaviours, as the Redis history list stores them."""

    user_id: str
    items: list[str]  # raw item ids, NEWEST FIRST
    timestamps: list[float]  # aligned with items
    profile: dict[str, str]  # user-column values at the user's latest event ("" = missing)


@dataclass
class InteractionLog:
    """One interaction log, one entry per event in file order.

    Raw ids are strings (numbers as their decimal text, docs/bundle.md). `item_categories` is the
    catalogue: each item's categories (MovieLens: movies.csv; generic logs: the first non-empty
    `category` value seen for the item).
    """

    source: str
    format: str
    user_ids: list[str]
    item_ids: list[str]
    timestamps: NDArray[np.float64]
    item_categories: dict[str, list[str]]
    ratings: NDArray[np.float64] | None = None
    labels: NDArray[np.float32] | None = None
    user_columns: dict[str, list[str]] = field(default_factory=dict)
    context_columns: dict[str, list[str]] = field(default_factory=dict)
    behaviors: list[str] | None = None  # each event's behaviour type, when the log has them
    ignored_columns: tuple[str, ...] = ()  # columns of the file that nothing reads

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def kind(self) -> Literal["rating", "label", "implicit"]:
        if self.labels is not None:
            return "label"
        return "rating" if self.ratings is not None else "implicit"

    def behaviour_mask(
        self, types: Sequence[str] | None = None, use_labels: bool = True
    ) -> NDArray[np.bool_]:
        """Events that count as behaviours (history entries); see the module docstring.

        types: the behaviour types that enter a history (None: every type). use_labels=False
        ignores the label column, as the implicit protocol does (every event is a behaviour).
        """
        mask = np.ones(len(self), dtype=bool)
        if use_labels and self.labels is not None:
            mask &= self.labels > 0.5
        if types is not None:
            mask &= self.type_mask(types)
        return mask

    def type_mask(self, types: Sequence[str]) -> NDArray[np.bool_]:
        """Events whose behaviour type is one of types; ValueError for a log without types."""
        if self.behaviors is None:
            raise ValueError(
                f"{self.source}: behaviour types were chosen but the log has no behaviour-type "
                "column (name it with --behavior-column)"
            )
        known = set(self.behaviors)
        unknown = sorted(set(types) - known)
        if unknown:
            raise ValueError(
                f"{self.source}: behaviour type(s) {unknown} do not occur in the log "
                f"(it has {sorted(known)})"
            )
        wanted = set(types)
        return np.fromiter((b in wanted for b in self.behaviors), dtype=bool, count=len(self))

    def head_users(self, n: int) -> InteractionLog:
        """The events of the first n users in order of first appearance (quick runs, tests)."""
        keep: set[str] = set()
        for user in self.user_ids:
            if len(keep) >= n:
                break
            keep.add(user)
        rows = np.fromiter((u in keep for u in self.user_ids), dtype=bool, count=len(self))
        return self.select(np.flatnonzero(rows))

    def select(self, rows: NDArray[np.int64]) -> InteractionLog:
        """A log holding only the given event rows (in that order)."""
        pick = rows.tolist()

        def take(values: list[str]) -> list[str]:
            return [values[i] for i in pick]

        return InteractionLog(
            source=self.source,
            format=self.format,
            user_ids=take(self.user_ids),
            item_ids=take(self.item_ids),
            timestamps=self.timestamps[rows],
            item_categories=self.item_categories,
            ratings=None if self.ratings is None else self.ratings[rows],
            labels=None if self.labels is None else self.labels[rows],
            user_columns={k: take(v) for k, v in self.user_columns.items()},
            context_columns={k: take(v) for k, v in self.context_columns.items()},
            behaviors=None if self.behaviors is None else take(self.behaviors),
            ignored_columns=self.ignored_columns,
        )

    def histories(
        self,
        max_length: int | None = None,
        types: Sequence[str] | None = None,
        use_labels: bool = True,
    ) -> Iterator[UserHistory]:
        """Each user's behaviours, newest first, capped at max_length; users in first-seen order.

        Events with equal timestamps keep their file order (the later line counts as newer).
        This is what `dinserve history load` writes to Redis: the same behaviours the training
        histories were built from.
        """
        users, user_codes = distinct_codes(self.user_ids)
        behaviour = self.behaviour_mask(types, use_labels)
        order = np.lexsort((np.arange(len(self)), self.timestamps, user_codes))
        order = order[behaviour[order]]
        starts = np.searchsorted(user_codes[order], np.arange(len(users)), side="left")
        ends = np.searchsorted(user_codes[order], np.arange(len(users)), side="right")
        first_seen = np.unique(user_codes, return_index=True)[1]
        for code in np.argsort(first_seen, kind="stable"):
            rows = order[starts[code]:ends[code]][::-1]
            if max_length is not None:
                rows = rows[:max_length]
            last = int(rows[0]) if len(rows) else int(first_seen[code])
            yield UserHistory(
                user_id=users[code],
                items=[self.item_ids[i] for i in rows],
                timestamps=self.timestamps[rows].tolist(),
                profile={k: v[last] for k, v in self.user_columns.items()},
            )


def detect_format(path: Path, fmt: str = "auto") -> str:
    """'movielens' for a folder, 'csv' / 'parquet' by suffix; an explicit fmt wins."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {list(FORMATS)}")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "movielens"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(
        f"{path}: cannot tell the format from the path (a folder is MovieLens, *.csv is a CSV "
        "log, *.parquet a Parquet log); pass --format"
    )


def read_log(
    path: Path | str,
    fmt: str = "auto",
    user_columns: Sequence[str] = (),
    context_columns: Sequence[str] = (),
    behavior_column: str | None = None,
) -> InteractionLog:
    """Read a MovieLens folder or a CSV/Parquet interaction log.

    Raises FileNotFoundError for a missing path and ValueError, naming the file and the row, for a
    missing column or a bad value. Group per user with InteractionLog.histories().
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    fmt = detect_format(path, fmt)
    wanted = _Wanted(tuple(user_columns), tuple(context_columns), behavior_column)
    if fmt == "movielens":
        return _read_movielens(path, wanted)
    columns, first_row = _read_parquet(path) if fmt == "parquet" else _read_csv(path)
    return _to_log(path, fmt, columns, first_row, wanted, renames={})


@dataclass(frozen=True)
class _Wanted:
    """The optional columns a caller asked for."""

    user: tuple[str, ...]
    context: tuple[str, ...]
    behavior: str | None

    def names(self) -> tuple[str, ...]:
        return (*self.user, *self.context, *([self.behavior] if self.behavior else []))


def _read_movielens(path: Path, wanted: _Wanted) -> InteractionLog:
    folder = path if path.is_dir() else path.parent
    ratings_path = folder / "ratings.csv"
    if not ratings_path.is_file():
        raise FileNotFoundError(f"{ratings_path} not found: is {folder} a MovieLens folder?")
    columns, first_row = _read_csv(ratings_path)
    renames = {"userId": "user_id", "movieId": "item_id"}
    log = _to_log(ratings_path, "movielens", columns, first_row, wanted, renames)
    if "rating" not in columns:
        raise ValueError(f"{ratings_path}: missing column 'rating' (found: {sorted(columns)})")
    movies_path = folder / "movies.csv"
    catalogue: dict[str, list[str]] = {}
    if movies_path.is_file():
        movies, _ = _read_csv(movies_path)
        for name in ("movieId", "genres"):
            if name not in movies:
                found = sorted(movies)
                raise ValueError(f"{movies_path}: missing column {name!r} (found: {found})")
        for movie, genres in zip(movies["movieId"], movies["genres"], strict=True):
            catalogue[movie] = [] if genres == MOVIELENS_NO_GENRE else _split_categories(genres)
    log.item_categories = catalogue
    return log


def _read_csv(path: Path) -> tuple[dict[str, list[str]], int]:
    """Columns by header name; the second value is the file line of the first data row."""
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to the first column.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        header = [h.strip() for h in header]
        rows = list(reader)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {i + 2}: {len(row)} fields, the header has {len(header)}"
            )
    return {name: [row[j] for row in rows] for j, name in enumerate(header)}, 2


def _read_parquet(path: Path) -> tuple[dict[str, list[str]], int]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow ships with the parquet and export extras
        raise ImportError(
            "reading Parquet logs needs pyarrow: pip install 'dinserve[parquet]'"
        ) from exc
    table = pq.read_table(path)
    columns: dict[str, list[str]] = {}
    for name in table.column_names:
        columns[name] = [_parquet_text(v) for v in table.column(name).to_pylist()]
    return columns, 1  # Parquet rows are 0-based; reported as "row i" below


def _parquet_text(value: Any) -> str:
    """Parquet cells as the text a CSV would hold: ids by decimal text, datetimes in epoch secs."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return repr(value.timestamp())
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _to_log(
    path: Path,
    fmt: str,
    columns: dict[str, list[str]],
    first_row: int,
    wanted: _Wanted,
    renames: dict[str, str],
) -> InteractionLog:
    columns = {renames.get(k, k): v for k, v in columns.items()}
    for name in (*REQUIRED_COLUMNS, *wanted.names()):
        if name not in columns:
            found = sorted(columns)
            raise ValueError(f"{path}: missing column {name!r} (found: {found})")
    where = _Where(path, fmt, first_row)
    users, items = columns["user_id"], columns["item_id"]
    for name, values in (("user_id", users), ("item_id", items)):
        if "" in values:
            raise ValueError(f"{where.row(values.index(''))}: empty {name}")
    timestamps = _parse_numbers(columns["timestamp"], "timestamp", where, allow_dates=True)
    ratings = labels = None
    if "label" in columns:
        labels = _parse_numbers(columns["label"], "label", where).astype(np.float32)
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if len(bad):
            value = columns["label"][bad[0]]
            raise ValueError(f"{where.row(int(bad[0]))}: label {value!r} is not 0 or 1")
    elif "rating" in columns:
        ratings = _parse_numbers(columns["rating"], "rating", where)
    catalogue: dict[str, list[str]] = {}
    if "category" in columns:
        for item, cats in zip(items, columns["category"], strict=True):
            if cats and item not in catalogue:
                catalogue[item] = _split_categories(cats)
    return InteractionLog(
        source=str(path),
        format=fmt,
        user_ids=users,
        item_ids=items,
        timestamps=timestamps,
        item_categories=catalogue,
        ratings=ratings,
        labels=labels,
        user_columns={name: columns[name] for name in wanted.user},
        context_columns={name: columns[name] for name in wanted.context},
        behaviors=None if wanted.behavior is None else columns[wanted.behavior],
        ignored_columns=tuple(
            name for name in columns if name not in (*KNOWN_COLUMNS, *wanted.names())
        ),
    )


@dataclass
class _Where:
    path: Path
    fmt: str
    first_row: int

    def row(self, i: int) -> str:
        if self.fmt == "parquet":
            return f"{self.path}, row {i}"
        return f"{self.path}, line {i + self.first_row}"


def _parse_numbers(
    values: list[str], name: str, where: _Where, allow_dates: bool = False
) -> NDArray[np.float64]:
    try:  # fast path: numpy parses the whole column at C speed
        parsed = np.asarray(values, dtype=np.float64)
    except ValueError:
        parsed = np.empty(len(values), dtype=np.float64)
        for i, text in enumerate(values):
            parsed[i] = _parse_number(text, name, where.row(i), allow_dates)
    bad = np.flatnonzero(~np.isfinite(parsed))
    if len(bad):
        raise ValueError(f"{where.row(int(bad[0]))}: {name} {values[bad[0]]!r} is not finite")
    return parsed


def _parse_number(text: str, name: str, where: str, allow_dates: bool) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    if allow_dates and text:
        try:  # ISO-8601; a naive time is read as UTC
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    expected = "a number or an ISO-8601 time" if allow_dates else "a number"
    raise ValueError(f"{where}: {name} {text!r} is not {expected}")


def _split_categories(text: str) -> list[str]:
    return [c.strip() for c in text.split(CATEGORY_SEPARATOR) if c.strip()]


def distinct_codes(values: list[str]) -> tuple[list[str], NDArray[np.int64]]:
    """Distinct values (sorted) and each entry's position among them."""
    uniques, inverse = np.unique(np.asarray(values, dtype=object), return_inverse=True)
    return uniques.tolist(), inverse.astype(np.int64).reshape(-1)
