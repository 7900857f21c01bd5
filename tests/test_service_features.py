"""service/features.py: request + history -> index arrays, against hand-computed indices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.config import Settings
from service.features import FeatureSpace, build_inputs, raw_index
from service.history import History
from service.model import CTRModel
from service.schemas import ScoreRequest
from service.vocab import ItemTable, Vocabulary

# items: "10" -> 2, "20" -> 3, "abc" -> 4, "007" -> 5; categories: A -> 2, B -> 3, C -> 4
ITEMS = ItemTable(Vocabulary(["10", "20", "abc", "007"]), [["A", "B"], [], ["C"], ["B"]])
CATEGORIES = Vocabulary(["A", "B", "C"])


def space(max_history_length: int = 3, features: bool = True) -> FeatureSpace:
    return FeatureSpace(
        items=ITEMS.items,
        categories=CATEGORIES,
        item_categories=np.array(ITEMS.category_matrix(CATEGORIES, 2), dtype=np.int64),
        user_features=(("age", Vocabulary(["young", "old"])),) if features else (),
        context_features=(("device", Vocabulary(["ios", "web"])), ("hour", Vocabulary(["9"])))
        if features else (),
        max_history_length=max_history_length,
    )


def request(**body: object) -> ScoreRequest:
    return ScoreRequest.model_validate({"user_id": "u", **body})


def test_candidates_keep_order_and_map_unknown_ids_to_oov() -> None:
    feeds = build_inputs(
        request(candidates=[{"item_id": "abc"}, {"item_id": "nope"}, {"item_id": 10}]),
        History(), space(features=False),
    )
    assert feeds["candidate_items"].tolist() == [4, 1, 2]
    assert feeds["candidate_categories"].tolist() == [[4, 0], [0, 0], [2, 3]]
    assert feeds["history_items"].shape == (0,)
    assert feeds["history_categories"].shape == (0, 2)
    assert set(feeds) == {"history_items", "history_categories", "candidate_items",
                          "candidate_categories"}
    assert all(a.dtype == np.int64 for a in feeds.values())


def test_integers_stand_for_their_decimal_text_only() -> None:
    feeds = build_inputs(
        request(candidates=[{"item_id": 20}, {"item_id": "20"}, {"item_id": 7},
                            {"item_id": "007"}, {"item_id": -20}]),
        History(), space(features=False),
    )
    # 7 is "7", which is not "007"; -20 is "-20", unknown.
    assert feeds["candidate_items"].tolist() == [3, 3, 1, 5, 1]
    assert raw_index(Vocabulary(["7", "07", "x"])) == {"7": 2, "07": 3, "x": 4, 7: 2}


def test_history_is_newest_first_capped_and_categorised() -> None:
    feeds = build_inputs(
        request(candidates=[{"item_id": "10"}]),
        History(items=["20", "zzz", "10", "abc", "007"]), space(max_history_length=3),
    )
    assert feeds["history_items"].tolist() == [3, 1, 2]
    assert feeds["history_categories"].tolist() == [[0, 0], [0, 0], [2, 3]]


def test_request_category_overrides_the_item_table_for_that_candidate_only() -> None:
    feeds = build_inputs(
        request(candidates=[
            {"item_id": "10", "category": "C"},
            {"item_id": "10"},
            {"item_id": "nope", "category": ["B", "unknown", "A"]},  # C = 2 keeps two
            {"item_id": "20", "category": None},
        ]),
        History(), space(features=False),
    )
    assert feeds["candidate_categories"].tolist() == [[4, 0], [2, 3], [3, 1], [0, 0]]
    # The shared table itself is untouched.
    assert space(features=False).item_categories[2].tolist() == [2, 3]


def test_profile_and_context_in_manifest_order_missing_is_padding() -> None:
    feeds = build_inputs(
        request(candidates=[{"item_id": "10"}], context={"hour": 9, "device": "tv", "x": "y"}),
        History(profile={"age": "old", "other": "1"}), space(),
    )
    assert feeds["user_features"].tolist() == [3]
    assert feeds["context_features"].tolist() == [1, 2]  # "tv" unknown -> OOV; 9 -> "9"
    empty = build_inputs(request(candidates=[{"item_id": "10"}]), History(), space())
    assert empty["user_features"].tolist() == [0]
    assert empty["context_features"].tolist() == [0, 0]


def test_features_build_exactly_the_manifest_contract(
    tiny_bundle: Path, plain_bundle: Path
) -> None:
    """Meta-test: what features.py feeds is what the exported manifest declares."""
    for bundle in (tiny_bundle, plain_bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())
        model = CTRModel.load(bundle, Settings(warmup_runs=0))
        declared = {i["name"]: i["shape"] for i in manifest["inputs"]}
        assert model.space.input_shapes() == declared
        feeds = build_inputs(
            request(candidates=[{"item_id": "x"}, {"item_id": "y"}], context={"device": "ios"}),
            History(items=["a", "b", "c"], profile={"age_bucket": "25-34"}), model.space,
        )
        assert set(feeds) == set(declared)
        for name, shape in declared.items():
            assert feeds[name].ndim == len(shape)
            for got, want in zip(feeds[name].shape, shape, strict=True):
                assert isinstance(want, str) or got == want
