"""Request + history -> the serving graph's named int64 arrays (docs/bundle.md). Pure functions.

The only code that knows both the wire format and the tensor layout. Conventions, shared with
model_export/din.py: index 0 is padding (also for a missing feature value), 1 is out-of-vocabulary,
real tokens start at 2. An item's categories come from the bundle's item table, one numpy row
lookup for all candidates at once; a category sent with a candidate replaces that row for this
request only. The history is looked up once and broadcast inside the graph, never tiled per
candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from model_export.vocab import PADDING_INDEX, Vocabulary
from service.history import History
from service.schemas import ScoreRequest

Int64Array = NDArray[np.int64]

HISTORY_ITEMS = "history_items"
HISTORY_CATEGORIES = "history_categories"
CANDIDATE_ITEMS = "candidate_items"
CANDIDATE_CATEGORIES = "candidate_categories"
USER_FEATURES = "user_features"
CONTEXT_FEATURES = "context_features"


@dataclass(frozen=True)
class FeatureSpace:
    """A bundle's vocabularies in the shape the lookups need; built once per model load."""

    items: Vocabulary
    categories: Vocabulary
    item_categories: Int64Array  # (n_items, C): row = item index; padding and OOV rows are 0
    user_features: tuple[tuple[str, Vocabulary], ...]
    context_features: tuple[tuple[str, Vocabulary], ...]
    max_history_length: int

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
    item_ids = [c.item_id for c in candidates]
    candidate_items = _indices(space.items, item_ids)  # (N,)
    candidate_categories = space.item_categories[candidate_items]  # (N, C), a fresh copy
    for row, candidate in enumerate(candidates):
        if candidate.category is not None:
            candidate_categories[row] = category_row(space, candidate.category)

    history_items = _indices(space.items, history.items[: space.max_history_length])  # (L,)
    feeds: dict[str, Int64Array] = {
        HISTORY_ITEMS: history_items,
        HISTORY_CATEGORIES: space.item_categories[history_items],  # (L, C)
        CANDIDATE_ITEMS: candidate_items,
        CANDIDATE_CATEGORIES: candidate_categories,
    }
    if space.user_features:
        feeds[USER_FEATURES] = sparse_row(space.user_features, history.profile)  # (U,)
    if space.context_features:
        feeds[CONTEXT_FEATURES] = sparse_row(space.context_features, request.context or {})  # (X,)
    return feeds


def category_row(space: FeatureSpace, categories: Sequence[str]) -> Int64Array:
    """Raw category names -> one (C,) row: the first C kept, unknown ones OOV, 0-padded."""
    row = np.full(space.max_categories, PADDING_INDEX, dtype=np.int64)
    kept = space.categories.indices(list(categories[: space.max_categories]))
    row[: len(kept)] = kept
    return row


def sparse_row(
    features: tuple[tuple[str, Vocabulary], ...], values: Mapping[str, str]
) -> Int64Array:
    """One index per feature in manifest order; a missing value is padding, an unknown one OOV."""
    return np.array(
        [
            vocab.index(values[name]) if name in values else PADDING_INDEX
            for name, vocab in features
        ],
        dtype=np.int64,
    )


def _indices(vocab: Vocabulary, raw_ids: Sequence[str]) -> Int64Array:
    return np.array(vocab.indices(raw_ids), dtype=np.int64).reshape(len(raw_ids))
