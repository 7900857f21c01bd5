"""Interaction log in, DIN training samples out: leakage-free histories, time split, vocabularies.

The log is read by service/interaction_log.py (read_log), the reader the history loader uses too,
so the histories the model trains on and the ones Redis serves are built from the same behaviours.
build_dataset() turns a log into dense index arrays per split (train / valid / test). Rules, each
tested in tests/test_data.py:
- History of a sample = the user's behaviours with a timestamp STRICTLY earlier than the target's,
  newest first, capped at max_history_length, 0-padded after the real entries. Equal timestamps are
  excluded: MovieLens users often rate many movies in the same second, and none of those may see
  the others.
- Split per user by time: the last ~10% of a user's events are test, the ~10% before are
  validation, the rest train; a user with at least 3 events gets at least one of each.
- Labels: the label column (it wins when a log has both), else rating >= threshold (DIN paper
  MovieLens protocol: 4.0); implicit logs (neither column) make every event a positive plus
  `negatives` sampled items per positive that the user never interacted with, sharing the
  positive's history, split and features.
- Categories: at most max_categories per item (default 4), in file order; padding 0 after them.
- Vocabularies (items, categories, features) come from training events only, with min_count;
  index 0 is padding, 1 is out-of-vocabulary (service/vocab.py). Categories of an item come
  from the item table, exactly as the service looks them up from the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.interaction_log import InteractionLog, distinct_codes
from service.vocab import PADDING_INDEX, ItemTable, Vocabulary

# 4 categories per item keep every genre of 96% of ml-latest-small's movies (2,851 have 1 genre,
# 987 have 4, 348 have more; the maximum is 10). Extra genres are dropped in file order.
DEFAULT_MAX_CATEGORIES = 4
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
MIN_EVENTS_TO_SPLIT = 3  # fewer events: the user's events all go to train


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
    users, user_codes = distinct_codes(log.user_ids)
    item_names, item_codes = distinct_codes(log.item_ids)
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
