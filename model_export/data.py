"""Interaction logs in, DIN training samples out: reading, leakage-free histories, time split.

Two input formats share one in-memory form, InteractionLog:
- a MovieLens folder (ratings.csv `userId,movieId,rating,timestamp` + movies.csv genres `A|B`);
- a generic log, CSV or Parquet, with columns `user_id,item_id,timestamp`, optional `category`
  (multi-valued `A|B`), optional `rating` or `label` (0/1), and any extra columns named as user
  profile or request context features.

build_dataset() turns a log into dense index arrays per split (train / valid / test). Rules, each
tested in tests/test_data.py:
- History of a sample = the user's behaviours with a timestamp STRICTLY earlier than the target's,
  newest first, capped at max_history_length, 0-padded after the real entries. Equal timestamps are
  excluded: MovieLens users often rate many movies in the same second, and none of those may see
  the others.
- Behaviours are every rated event for rating logs (a rating means the user watched the movie),
  label-1 events for labelled logs (a shown-but-not-clicked impression is not a behaviour), and
  every event for implicit logs.
- Split per user by time: the last ~10% of a user's events are test, the ~10% before are
  validation, the rest train; a user with at least 3 events gets at least one of each.
- Labels: the label column (it wins when a log has both), else rating >= threshold (DIN paper
  MovieLens protocol: 4.0); implicit logs (neither column) make every event a positive plus
  `negatives` sampled items per positive that the user never interacted with, sharing the
  positive's history, split and features.
- Categories: at most max_categories per item (default 4), in file order; padding 0 after them.
- Vocabularies (items, categories, features) come from training events only, with min_count;
  index 0 is padding, 1 is out-of-vocabulary (model_export/vocab.py). Categories of an item come
  from the item table, exactly as the service looks them up from the bundle.

Torch-free (numpy + csv; pyarrow only for Parquet), so service/history_loader.py can use
read_log() and InteractionLog.histories() without the training extra.
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

from model_export.vocab import PADDING_INDEX, ItemTable, Vocabulary

Format = Literal["auto", "movielens", "csv", "parquet"]
FORMATS: tuple[str, ...] = ("auto", "movielens", "csv", "parquet")
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
CATEGORY_SEPARATOR = "|"
MOVIELENS_NO_GENRE = "(no genres listed)"

# 4 categories per item keep every genre of 96% of ml-latest-small's movies (2,851 have 1 genre,
# 987 have 4, 348 have more; the maximum is 10). Extra genres are dropped in file order.
DEFAULT_MAX_CATEGORIES = 4
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
MIN_EVENTS_TO_SPLIT = 3  # fewer events: the user's events all go to train


# ----------------------------------------------------------------------------------------------
# Reading


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

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def kind(self) -> Literal["rating", "label", "implicit"]:
        if self.labels is not None:
            return "label"
        return "rating" if self.ratings is not None else "implicit"

    def behaviour_mask(self) -> NDArray[np.bool_]:
        """Events that count as behaviours (history entries); see the module docstring."""
        if self.labels is not None:
            return self.labels > 0.5
        return np.ones(len(self), dtype=bool)

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
        )

    def histories(self, max_length: int | None = None) -> Iterator[UserHistory]:
        """Each user's behaviours, newest first, capped at max_length; users in first-seen order.

        Events with equal timestamps keep their file order (the later line counts as newer).
        This is what `dinserve history load` writes to Redis: the same behaviours the training
        histories were built from.
        """
        users, user_codes = _codes(self.user_ids)
        behaviour = self.behaviour_mask()
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
) -> InteractionLog:
    """Read a MovieLens folder or a CSV/Parquet interaction log.

    Raises FileNotFoundError for a missing path and ValueError, naming the file and the row, for a
    missing column or a bad value. Group per user with InteractionLog.histories().
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    fmt = detect_format(path, fmt)
    if fmt == "movielens":
        return _read_movielens(path, user_columns, context_columns)
    columns, first_row = _read_parquet(path) if fmt == "parquet" else _read_csv(path)
    return _to_log(path, fmt, columns, first_row, user_columns, context_columns, renames={})


def _read_movielens(
    path: Path, user_columns: Sequence[str], context_columns: Sequence[str]
) -> InteractionLog:
    folder = path if path.is_dir() else path.parent
    ratings_path = folder / "ratings.csv"
    if not ratings_path.is_file():
        raise FileNotFoundError(f"{ratings_path} not found: is {folder} a MovieLens folder?")
    columns, first_row = _read_csv(ratings_path)
    renames = {"userId": "user_id", "movieId": "item_id"}
    log = _to_log(
        ratings_path, "movielens", columns, first_row, user_columns, context_columns, renames
    )
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
    except ImportError as exc:  # pragma: no cover - pyarrow ships with the export extra
        raise ImportError(
            "reading Parquet logs needs pyarrow: pip install 'dinserve[export]'"
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
    user_columns: Sequence[str],
    context_columns: Sequence[str],
    renames: dict[str, str],
) -> InteractionLog:
    columns = {renames.get(k, k): v for k, v in columns.items()}
    for name in (*REQUIRED_COLUMNS, *user_columns, *context_columns):
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
        user_columns={name: columns[name] for name in user_columns},
        context_columns={name: columns[name] for name in context_columns},
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


def _codes(values: list[str]) -> tuple[list[str], NDArray[np.int64]]:
    """Distinct values (sorted) and each entry's position among them."""
    uniques, inverse = np.unique(np.asarray(values, dtype=object), return_inverse=True)
    return uniques.tolist(), inverse.astype(np.int64).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class SampleOptions:
    max_history_length: int = 50
    max_categories: int = DEFAULT_MAX_CATEGORIES
    label_threshold: float = 4.0
    negatives: int = 1
    min_count: int = 1
    seed: int = 2018


@dataclass
class Split:
    """S samples as dense arrays; row i of every array belongs to sample i."""

    history_items: NDArray[np.int64]  # [S, L], newest first, 0-padded after the real entries
    history_categories: NDArray[np.int64]  # [S, L, C]
    candidate_items: NDArray[np.int64]  # [S]
    candidate_categories: NDArray[np.int64]  # [S, C]
    user_features: NDArray[np.int64]  # [S, U]
    context_features: NDArray[np.int64]  # [S, X]
    labels: NDArray[np.float32]  # [S]
    users: NDArray[np.int64]  # [S] user code, for GAUC
    events: NDArray[np.int64]  # [S] the log row each sample's target came from

    def __len__(self) -> int:
        return len(self.labels)

    def arrays(self) -> dict[str, NDArray[Any]]:
        """The model inputs by their tensor names (docs/bundle.md)."""
        return {
            "history_items": self.history_items,
            "history_categories": self.history_categories,
            "candidate_items": self.candidate_items,
            "candidate_categories": self.candidate_categories,
            "user_features": self.user_features,
            "context_features": self.context_features,
        }


@dataclass
class Dataset:
    """Train / valid / test splits with the vocabularies built from the training split."""

    train: Split
    valid: Split
    test: Split
    item_table: ItemTable
    categories: Vocabulary
    user_features: dict[str, Vocabulary]
    context_features: dict[str, Vocabulary]
    label_rule: str
    options: SampleOptions
    n_users: int
    n_events: int

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def build_dataset(log: InteractionLog, options: SampleOptions = SampleOptions()) -> Dataset:
    """Samples for every event of the log; see the module docstring for the rules."""
    if len(log) == 0:
        raise ValueError(f"{log.source}: no events")
    if options.max_history_length < 1 or options.max_categories < 1:
        raise ValueError("max_history_length and max_categories must be >= 1")
    n = len(log)
    users, user_codes = _codes(log.user_ids)
    item_names, item_codes = _codes(log.item_ids)
    split = _time_split(user_codes, log.timestamps)
    train_rows = np.flatnonzero(split == 0)

    # Vocabularies from training events only: a test-only item is out-of-vocabulary.
    items = Vocabulary.build((log.item_ids[i] for i in train_rows), options.min_count)
    catalogue = log.item_categories
    kept = options.max_categories
    categories = Vocabulary.build(
        (c for i in train_rows for c in catalogue.get(log.item_ids[i], [])[:kept]),
        options.min_count,
    )
    item_table = ItemTable(
        items, [catalogue.get(t, [])[:options.max_categories] for t in items.tokens]
    )
    category_matrix = np.asarray(
        item_table.category_matrix(categories, options.max_categories), dtype=np.int64
    )
    item_index_of_code = np.asarray(items.indices(item_names), dtype=np.int64)
    event_items = item_index_of_code[item_codes]

    user_vocabs = {k: _feature_vocab(v, train_rows, options) for k, v in log.user_columns.items()}
    context_vocabs = {
        k: _feature_vocab(v, train_rows, options) for k, v in log.context_columns.items()
    }
    user_matrix = _feature_matrix(log.user_columns, user_vocabs, n)
    context_matrix = _feature_matrix(log.context_columns, context_vocabs, n)

    history_rows = _history_rows(
        user_codes, log.timestamps, log.behaviour_mask(), options.max_history_length
    )

    # Targets: one sample per event, plus sampled negatives for implicit logs.
    targets = np.arange(n, dtype=np.int64)
    candidates = event_items
    if log.kind == "label":
        assert log.labels is not None
        labels = log.labels.astype(np.float32)
        label_rule = "label column (1 = positive)"
    elif log.kind == "rating":
        assert log.ratings is not None
        labels = (log.ratings >= options.label_threshold).astype(np.float32)
        label_rule = f"rating >= {options.label_threshold:g}"
    else:
        if options.negatives < 1:
            raise ValueError(
                f"{log.source}: no rating or label column, so negatives must be sampled; "
                "--negatives must be >= 1"
            )
        negative_codes = _sample_negatives(user_codes, item_codes, len(item_names), options)
        targets = np.concatenate([targets, np.repeat(targets, options.negatives)])
        candidates = np.concatenate([event_items, item_index_of_code[negative_codes]])
        labels = np.concatenate(
            [np.ones(n, dtype=np.float32), np.zeros(n * options.negatives, dtype=np.float32)]
        )
        label_rule = (
            f"implicit: every event positive, {options.negatives} sampled negative(s) per "
            f"positive (uniform over items the user never interacted with, seed {options.seed})"
        )

    def make(part: int) -> Split:
        pick = np.flatnonzero(split[targets] == part)
        rows = history_rows[targets[pick]]  # [S, L], -1 = padding
        hist = np.where(rows >= 0, event_items[rows], PADDING_INDEX)
        cand = candidates[pick]
        return Split(
            history_items=hist,
            history_categories=category_matrix[hist],
            candidate_items=cand,
            candidate_categories=category_matrix[cand],
            user_features=user_matrix[targets[pick]],
            context_features=context_matrix[targets[pick]],
            labels=labels[pick],
            users=user_codes[targets[pick]],
            events=targets[pick],
        )

    return Dataset(
        train=make(0),
        valid=make(1),
        test=make(2),
        item_table=item_table,
        categories=categories,
        user_features=user_vocabs,
        context_features=context_vocabs,
        label_rule=label_rule,
        options=options,
        n_users=len(users),
        n_events=n,
    )


def _time_split(user_codes: NDArray[np.int64], timestamps: NDArray[np.float64]) -> NDArray[np.int8]:
    """0 train, 1 valid, 2 test per event: each user's last events (by time) go to valid/test."""
    n = len(user_codes)
    order = np.lexsort((np.arange(n), timestamps, user_codes))
    sorted_users = user_codes[order]
    counts = np.bincount(user_codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(n) - starts[sorted_users]  # 0 = the user's oldest event
    total = counts[sorted_users]
    n_test = np.maximum(1, np.rint(total * TEST_FRACTION)).astype(np.int64)
    n_valid = np.maximum(1, np.rint(total * VALID_FRACTION)).astype(np.int64)
    splittable = total >= MIN_EVENTS_TO_SPLIT
    part = np.zeros(n, dtype=np.int8)
    part[splittable & (position >= total - n_test - n_valid)] = 1
    part[splittable & (position >= total - n_test)] = 2
    split = np.empty(n, dtype=np.int8)
    split[order] = part
    return split


def _history_rows(
    user_codes: NDArray[np.int64],
    timestamps: NDArray[np.float64],
    behaviour: NDArray[np.bool_],
    max_length: int,
) -> NDArray[np.int64]:
    """[n, L] log rows of each event's history (newest first), -1 after the real entries.

    One sort and one binary search for the whole log: with behaviours ordered by (user, time), the
    behaviours strictly before an event (u, t) end at the first key >= (u, t), so equal timestamps
    are excluded by construction.
    """
    _, time_rank = np.unique(timestamps, return_inverse=True)
    time_rank = time_rank.reshape(-1).astype(np.int64)
    stride = int(time_rank.max()) + 2
    keys = user_codes * stride + time_rank  # orders events by (user, time); ties share a key
    rows = np.flatnonzero(behaviour)
    rows = rows[np.argsort(keys[rows], kind="stable")]  # equal keys keep file order
    sorted_keys = keys[rows]
    end = np.searchsorted(sorted_keys, keys, side="left")  # first behaviour not strictly earlier
    start = np.searchsorted(sorted_keys, user_codes * stride, side="left")  # user's first one
    offsets = np.arange(max_length, dtype=np.int64)
    positions = end[:, None] - 1 - offsets[None, :]  # [n, L], newest first
    valid = positions >= start[:, None]
    if len(rows) == 0:
        return np.full((len(keys), max_length), -1, dtype=np.int64)
    return np.where(valid, rows[np.clip(positions, 0, len(rows) - 1)], -1)


def _sample_negatives(
    user_codes: NDArray[np.int64], item_codes: NDArray[np.int64], n_items: int,
    options: SampleOptions,
) -> NDArray[np.int64]:
    """options.negatives item codes per event, uniform over items its user never interacted with."""
    rng = np.random.default_rng(options.seed)
    seen = np.unique(user_codes * n_items + item_codes)  # (user, item) pairs, sorted
    owners = np.repeat(user_codes, options.negatives)
    per_user = np.bincount(seen // n_items, minlength=int(user_codes.max()) + 1)
    if np.any(per_user[owners] >= n_items):
        raise ValueError("a user interacted with every item: no negative can be sampled for them")
    drawn = rng.integers(0, n_items, size=len(owners))
    # Rejection sampling: redraw the collisions until none are left. Each round keeps a draw with
    # probability 1 - seen/n_items, so a few rounds suffice on any realistic catalogue.
    while True:
        hit = _contains(seen, owners * n_items + drawn)
        if not hit.any():
            return drawn
        drawn[hit] = rng.integers(0, n_items, size=int(hit.sum()))


def _contains(sorted_values: NDArray[np.int64], queries: NDArray[np.int64]) -> NDArray[np.bool_]:
    at = np.searchsorted(sorted_values, queries)
    found: NDArray[np.bool_] = sorted_values[np.minimum(at, len(sorted_values) - 1)] == queries
    return found


def _feature_vocab(
    values: list[str], train_rows: NDArray[np.int64], options: SampleOptions
) -> Vocabulary:
    return Vocabulary.build((values[i] for i in train_rows), options.min_count)


def _feature_matrix(
    columns: dict[str, list[str]], vocabs: dict[str, Vocabulary], n: int
) -> NDArray[np.int64]:
    """[n, F] indices; an empty cell is a missing value, i.e. padding (docs/bundle.md)."""
    matrix = np.zeros((n, len(columns)), dtype=np.int64)
    for j, (name, values) in enumerate(columns.items()):
        index = vocabs[name].index
        matrix[:, j] = [PADDING_INDEX if v == "" else index(v) for v in values]
    return matrix
