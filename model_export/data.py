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


PROTOCOLS = ("auto", "explicit", "implicit")
SAMPLERS = ("uniform", "popularity")


@dataclass(frozen=True)
class SampleOptions:
    """How a log becomes samples.

    protocol: "explicit" takes labels from the label column, else rating >= label_threshold (the
    DIN paper's MovieLens protocol); "implicit" makes every behaviour a positive and samples
    `negatives` items per positive (the DIN authors' code on Amazon: the next real behaviour
    against a sampled item, history before it), ignoring any rating or label column; "auto" is
    explicit when the log has a label or rating column, else implicit.
    negative_sampler: "uniform" draws among the distinct items of the positive's own split,
    "popularity" in proportion to how often each item occurs there (harder negatives, closer to
    what a ranking stage sees). Both exclude the user's own items and are fixed by `seed`.
    history_behaviors / positive_behaviors: with a behaviour-type column, the types that enter
    histories and (implicit protocol) the types that are positives; None means every type.
    """

    max_history_length: int = 50
    max_categories: int = DEFAULT_MAX_CATEGORIES
    label_threshold: float = 4.0
    negatives: int = 1
    min_count: int = 1
    seed: int = 2018
    protocol: str = "auto"
    negative_sampler: str = "uniform"
    history_behaviors: tuple[str, ...] | None = None
    positive_behaviors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: choose from {list(PROTOCOLS)}")
        if self.negative_sampler not in SAMPLERS:
            raise ValueError(
                f"negative sampler {self.negative_sampler!r}: choose from {list(SAMPLERS)}"
            )


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

    implicit = _protocol(log, options) == "implicit"
    history_rows = _history_rows(
        user_codes,
        log.timestamps,
        log.behaviour_mask(options.history_behaviors, use_labels=not implicit),
        options.max_history_length,
    )

    # Targets: one sample per event (explicit), or per positive plus its sampled negatives.
    targets = np.arange(n, dtype=np.int64)
    candidates = event_items
    if not implicit and log.labels is not None:
        labels = log.labels.astype(np.float32)
        label_rule = "label column (1 = positive)"
    elif not implicit:
        assert log.ratings is not None
        labels = (log.ratings >= options.label_threshold).astype(np.float32)
        label_rule = f"rating >= {options.label_threshold:g}"
    else:
        if options.positive_behaviors is not None:
            targets = np.flatnonzero(log.type_mask(options.positive_behaviors))
        negative_codes = _sample_negatives(user_codes, item_codes, split, targets, options)
        positives = len(targets)
        candidates = np.concatenate([event_items[targets], item_index_of_code[negative_codes]])
        targets = np.concatenate([targets, np.repeat(targets, options.negatives)])
        labels = np.concatenate([
            np.ones(positives, dtype=np.float32),
            np.zeros(positives * options.negatives, dtype=np.float32),
        ])
        which = ("every event" if options.positive_behaviors is None
                 else f"every {'/'.join(options.positive_behaviors)} event")
        label_rule = (
            f"implicit: {which} positive, {options.negatives} sampled negative(s) per positive "
            f"({options.negative_sampler} over the items of the positive's split that the user "
            f"never interacted with, seed {options.seed})"
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


def _protocol(log: InteractionLog, options: SampleOptions) -> str:
    """The protocol options.protocol resolves to for this log; ValueError when it cannot apply."""
    protocol = options.protocol
    if protocol == "auto":
        protocol = "implicit" if log.kind == "implicit" else "explicit"
    if protocol == "explicit" and log.kind == "implicit":
        raise ValueError(
            f"{log.source}: no rating or label column for the explicit protocol; use "
            "--protocol implicit (sampled negatives)"
        )
    if protocol == "explicit" and options.positive_behaviors is not None:
        raise ValueError("positive behaviour types apply to --protocol implicit only")
    if protocol == "implicit" and options.negatives < 1:
        raise ValueError(
            f"{log.source}: the implicit protocol samples negatives; --negatives must be >= 1"
        )
    return protocol


# Rounds of redrawing the negatives that hit one of the user's own items, before falling back to
# the whole catalogue: only a split whose items are nearly all the user's own needs more.
REDRAW_ROUNDS = 50


def _sample_negatives(
    user_codes: NDArray[np.int64],
    item_codes: NDArray[np.int64],
    split: NDArray[np.int8],
    positives: NDArray[np.int64],
    options: SampleOptions,
) -> NDArray[np.int64]:
    """options.negatives item codes per positive event, drawn from the positive's own split.

    Drawing from the items of the same split keeps "out of vocabulary" free of label information:
    a training negative is a training item, known like every training positive, and a test
    negative is a test item, unknown exactly as often as test positives are. Drawing from the whole
    log instead made unknown items mostly negatives in training and mostly positives in test, on a
    sparse catalogue (most items seen once), and pushed test AUC below 0.5.
    """
    rng = np.random.default_rng(options.seed)
    n_items = int(item_codes.max()) + 1
    seen = np.unique(user_codes * n_items + item_codes)  # (user, item) pairs, sorted
    rows = np.repeat(positives, options.negatives)
    drawn = np.empty(len(rows), dtype=np.int64)
    for part in (0, 1, 2):
        at = np.flatnonzero(split[rows] == part)
        if len(at) == 0:
            continue
        pool = item_codes[positives[split[positives] == part]]
        if options.negative_sampler == "uniform":
            pool = np.unique(pool)
        drawn[at] = _draw_unseen(rng, pool, user_codes[rows[at]], seen, n_items)
    return drawn


def _draw_unseen(
    rng: np.random.Generator,
    pool: NDArray[np.int64],
    owners: NDArray[np.int64],
    seen: NDArray[np.int64],
    n_items: int,
) -> NDArray[np.int64]:
    """One item of pool per owner that the owner never interacted with (rejection sampling)."""
    drawn = pool[rng.integers(0, len(pool), size=len(owners))]
    for _ in range(REDRAW_ROUNDS):
        hit = _contains(seen, owners * n_items + drawn)
        if not hit.any():
            return drawn
        drawn[hit] = pool[rng.integers(0, len(pool), size=int(hit.sum()))]
    # The pool is (nearly) all the owner's own items: draw the rest from the whole catalogue.
    hit = _contains(seen, owners * n_items + drawn)
    per_user = np.bincount(seen // n_items, minlength=int(owners.max()) + 1)
    if np.any(per_user[owners[hit]] >= n_items):
        raise ValueError("a user interacted with every item: no negative can be sampled for them")
    while hit.any():
        drawn[hit] = rng.integers(0, n_items, size=int(hit.sum()))
        hit = _contains(seen, owners * n_items + drawn)
    return drawn


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
