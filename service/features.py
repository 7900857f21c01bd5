"""Request + history -> the serving graph's named int64 arrays (docs/bundle.md). Pure functions.

The only code that knows both the wire format and the tensor layout. Conventions, shared with
the trained model (service/vocab.py, docs/bundle.md): index 0 is padding (also for a missing
feature value), 1 is out-of-vocabulary, real tokens start at 2. An item's categories come from
the bundle's item table, one numpy row lookup for all candidates at once; a category sent with
a candidate replaces that row for this request only. The history is looked up once and broadcast
inside the graph, never tiled per candidate.

A raw id may arrive as a JSON integer: it stands for its decimal text. Rather than formatting every
integer per request (str() of 200 ints costs more than the lookups themselves), each lookup table
also holds the integer form of every token that is canonical decimal text ("42", not "042").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

import numpy as np
from numpy.typing import NDArray

from service.bundle import (
    CANDIDATE_CATEGORIES,
    CANDIDATE_ITEMS,
    CONTEXT_FEATURES,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    USER_FEATURES,
)
from service.history import History
from service.schemas import ScoreRequest
from service.vocab import OOV_INDEX, PADDING_INDEX, Vocabulary

Int64Array = NDArray[np.int64]
RawIndex = dict[int | str, int]
_ITEM_ID = itemgetter("item_id")


def raw_index(vocab: Vocabulary) -> RawIndex:
    """token -> index, plus int(token) -> index for tokens that are canonical decimal integers."""
    index: RawIndex = {token: vocab.index(token) for token in vocab.tokens}
    for token, i in list(index.items()):
        assert isinstance(token, str)
        if token[-1:].isdigit():
            try:
                number = int(token)
            except ValueError:
                continue
            if str(number) == token:  # "007", "+7", "1_0" stay text-only
                index[number] = i
    return index


@dataclass(frozen=True)
class FeatureSpace:
    """A bundle's vocabularies in the shape the lookups need; built once per model load."""

    items: Vocabulary
    categories: Vocabulary
    item_categories: Int64Array  # (n_items, C): row = item index; padding and OOV rows are 0
    user_features: tuple[tuple[str, Vocabulary], ...]
    context_features: tuple[tuple[str, Vocabulary], ...]
    max_history_length: int
    item_index: RawIndex = field(init=False, repr=False)
    category_index: RawIndex = field(init=False, repr=False)
    feature_index: dict[str, RawIndex] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: derived tables are set once, here
        set_(self, "item_index", raw_index(self.items))
        set_(self, "category_index", raw_index(self.categories))
        set_(
            self,
            "feature_index",
            {
                name: raw_index(vocab)
                for name, vocab in (*self.user_features, *self.context_features)
            },
        )

    @property
    def max_categories(self) -> int:
        return int(self.item_categories.shape[1])

    def input_shapes(self) -> dict[str, list[str | int]]:
        """The serving graph's inputs for this feature space: name -> shape (docs/bundle.md)."""
        c = self.max_categories
        shapes: dict[str, list[str | int]] = {
            HISTORY_ITEMS: ["L"],
            HISTORY_CATEGORIES: ["L", c],
            CANDIDATE_ITEMS: ["N"],
            CANDIDATE_CATEGORIES: ["N", c],
        }
        if self.user_features:
            shapes[USER_FEATURES] = [len(self.user_features)]
        if self.context_features:
            shapes[CONTEXT_FEATURES] = [len(self.context_features)]
        return shapes


def build_inputs(
    request: ScoreRequest, history: History, space: FeatureSpace
) -> dict[str, Int64Array]:
    """The feeds for one ONNX run: history (L), candidates (N), optional user/context (U), (X)."""
    candidates = request.candidates
    get = space.item_index.get
    # map() over C-level callables rather than a generator: no Python frame per id (~15% of
    # the lookups' time at W1, docs/performance.md).
    candidate_items = np.fromiter(
        map(get, map(_ITEM_ID, candidates), repeat(OOV_INDEX)), dtype=np.int64,
        count=len(candidates),
    )  # (N,)
    candidate_categories = space.item_categories[candidate_items]  # (N, C), a fresh copy
    for row, candidate in enumerate(candidates):
        if "category" in candidate and (override := candidate["category"]) is not None:
            candidate_categories[row] = category_row(space, override)

    recent = history.items[: space.max_history_length]
    history_items = np.fromiter(
        map(get, recent, repeat(OOV_INDEX)), dtype=np.int64, count=len(recent)
    )  # (L,)
    feeds: dict[str, Int64Array] = {
        HISTORY_ITEMS: history_items,
        HISTORY_CATEGORIES: space.item_categories[history_items],  # (L, C)
        CANDIDATE_ITEMS: candidate_items,
        CANDIDATE_CATEGORIES: candidate_categories,
    }
    if space.user_features:
        feeds[USER_FEATURES] = sparse_row(space, space.user_features, history.profile)  # (U,)
    if space.context_features:
        context = request.context or {}
        feeds[CONTEXT_FEATURES] = sparse_row(space, space.context_features, context)  # (X,)
    return feeds


def category_row(space: FeatureSpace, categories: int | str | Sequence[int | str]) -> Int64Array:
    """Raw category names -> one (C,) row: the first C kept, unknown ones OOV, 0-padded."""
    names = [categories] if isinstance(categories, int | str) else categories
    get = space.category_index.get
    row = np.full(space.max_categories, PADDING_INDEX, dtype=np.int64)
    kept = [get(c, OOV_INDEX) for c in names[: space.max_categories]]
    row[: len(kept)] = kept
    return row


def sparse_row(
    space: FeatureSpace,
    features: tuple[tuple[str, Vocabulary], ...],
    values: Mapping[str, int | str],
) -> Int64Array:
    """One index per feature in manifest order; a missing value is padding, an unknown one OOV."""
    return np.array(
        [
            space.feature_index[name].get(values[name], OOV_INDEX)
            if name in values
            else PADDING_INDEX
            for name, _ in features
        ],
        dtype=np.int64,
    )
