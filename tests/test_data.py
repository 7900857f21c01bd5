"""Sample building: no leakage, time split per user, labels, vocabularies, formats, errors.

Uses a slice of the real MovieLens data plus small hand-written logs whose right answer is known.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from model_export.data import Dataset, SampleOptions, Split, build_dataset
from service.interaction_log import InteractionLog, detect_format, read_log
from service.vocab import FIRST_TOKEN_INDEX, OOV_INDEX, PADDING_INDEX

MOVIELENS = Path(__file__).resolve().parents[1] / "data" / "ml-latest-small"


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def raw_items(data: Dataset, indices: np.ndarray) -> list[str]:
    """Raw ids of real (>= 2) item indices."""
    tokens = data.item_table.items.tokens
    return [tokens[i - FIRST_TOKEN_INDEX] for i in indices.tolist()]


def all_samples(data: Dataset) -> list[tuple[str, Split]]:
    return list(data.splits().items())


@pytest.fixture(scope="module")
def movielens_slice() -> tuple[InteractionLog, Dataset]:
    log = read_log(MOVIELENS).head_users(30)
    return log, build_dataset(log, SampleOptions(max_history_length=20))


# -- no leakage -------------------------------------------------------------------------------


def test_history_holds_only_strictly_earlier_events_on_real_data(
    movielens_slice: tuple[InteractionLog, Dataset],
) -> None:
    log, data = movielens_slice
    # MovieLens holds one rating per (user, movie): the pair identifies the event.
    when = {(u, i): t for u, i, t in zip(log.user_ids, log.item_ids, log.timestamps, strict=True)}
    users = np.asarray(log.user_ids)
    checked = equal_time_events = 0
    for _, split in all_samples(data):
        for s in range(len(split)):
            event = int(split.events[s])
            user, target_time = log.user_ids[event], log.timestamps[event]
            real = split.history_items[s][split.history_items[s] != PADDING_INDEX]
            # Every event of the user strictly earlier than the target, capped: exactly that many.
            earlier = int(((users == user) & (log.timestamps < target_time)).sum())
            assert len(real) == min(earlier, 20)
            equal_time_events += int(((users == user) & (log.timestamps == target_time)).sum()) - 1
            times = [when[(user, item)] for item in raw_items(data, real[real != OOV_INDEX])]
            assert all(t < target_time for t in times)
            assert times == sorted(times, reverse=True)  # newest first
            checked += len(times)
    assert checked > 10_000
    assert equal_time_events > 1_000  # the slice really exercises equal timestamps


def test_equal_timestamps_never_see_each_other(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], [
        ["u", "a", 10, 5], ["u", "b", 20, 5], ["u", "c", 20, 1], ["u", "d", 20, 5],
        ["u", "e", 30, 5], ["u", "a2", 5, 4], ["u", "f", 40, 2], ["u", "g", 50, 5],
        ["u", "h", 60, 5], ["u", "i", 70, 3],
    ])
    log = read_log(path)
    data = build_dataset(log, SampleOptions(max_history_length=10))
    histories: dict[str, list[str]] = {}
    for _, split in all_samples(data):
        for s in range(len(split)):
            real = split.history_items[s][split.history_items[s] != PADDING_INDEX]
            histories[log.item_ids[int(split.events[s])]] = [
                "OOV" if i == OOV_INDEX else raw_items(data, np.array([i]))[0] for i in real
            ]
    assert histories["a2"] == []
    assert histories["a"] == ["a2"]
    for same_second in ("b", "c", "d"):
        assert histories[same_second] == ["a", "a2"]
    assert histories["e"][:3] == ["d", "c", "b"]  # equal times keep file order, newest first
    assert len(histories["e"]) == 5


def test_history_is_padded_after_the_real_entries(
    movielens_slice: tuple[InteractionLog, Dataset],
) -> None:
    _, data = movielens_slice
    for _, split in all_samples(data):
        real = split.history_items != PADDING_INDEX
        lengths = real.sum(axis=1)
        positions = np.arange(real.shape[1])[None, :]
        assert np.array_equal(real, positions < lengths[:, None])
        # a padded behaviour has padded categories
        assert (split.history_categories[~real] == PADDING_INDEX).all()


# -- split and labels -------------------------------------------------------------------------


def test_split_is_per_user_by_time(movielens_slice: tuple[InteractionLog, Dataset]) -> None:
    log, data = movielens_slice
    per_user: dict[str, dict[str, list[float]]] = {}
    for name, split in all_samples(data):
        for event in split.events.tolist():
            per_user.setdefault(log.user_ids[event], {}).setdefault(name, []).append(
                float(log.timestamps[event])
            )
    assert len(per_user) == 30
    for user, parts in per_user.items():
        assert set(parts) == {"train", "valid", "test"}, user  # MovieLens users have >= 20 events
        assert max(parts["train"]) <= min(parts["valid"])
        assert max(parts["valid"]) <= min(parts["test"])
        total = sum(len(v) for v in parts.values())
        assert len(parts["test"]) == max(1, round(total * 0.1))
    assert sum(len(s) for _, s in all_samples(data)) == len(log)


def test_a_user_with_three_events_gets_one_of_each_split(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], [
        ["u", "a", 1, 5], ["u", "b", 2, 1], ["u", "c", 3, 5], ["v", "a", 1, 5], ["v", "b", 2, 1],
    ])
    data = build_dataset(read_log(path))
    assert (len(data.train), len(data.valid), len(data.test)) == (3, 1, 1)


def test_labels_follow_the_rating_threshold(
    movielens_slice: tuple[InteractionLog, Dataset],
) -> None:
    log, data = movielens_slice
    assert log.ratings is not None
    for _, split in all_samples(data):
        expected = (log.ratings[split.events] >= 4.0).astype(np.float32)
        np.testing.assert_array_equal(split.labels, expected)
    strict = build_dataset(log, SampleOptions(max_history_length=20, label_threshold=4.5))
    assert strict.train.labels.sum() < data.train.labels.sum()
    assert data.label_rule == "rating >= 4"


# -- vocabularies -----------------------------------------------------------------------------


def test_items_only_in_test_are_out_of_vocabulary_not_padding(tmp_path: Path) -> None:
    rows: list[list[object]] = [["u", f"i{t}", t, 5] for t in range(18)]
    rows += [["u", "late1", 18, 5], ["u", "late2", 19, 1]]
    data = build_dataset(read_log(write_csv(tmp_path / "log.csv",
                                            ["user_id", "item_id", "timestamp", "rating"], rows)))
    assert data.test.candidate_items.tolist() == [OOV_INDEX, OOV_INDEX]
    assert "late1" not in data.item_table.items.tokens
    assert OOV_INDEX != PADDING_INDEX
    assert (data.train.candidate_items >= FIRST_TOKEN_INDEX).all()
    # "late1" (valid) is in the test sample's history as OOV, distinct from the padding after it
    history = data.test.history_items[1]
    assert history[0] == OOV_INDEX and history[19] == PADDING_INDEX


def test_min_count_maps_rare_items_to_oov(tmp_path: Path) -> None:
    rows: list[list[object]] = []
    for user in ("u", "v", "w"):
        rows += [[user, "common", 1, 5], [user, f"rare-{user}", 2, 5]]
        rows += [[user, f"tail{k}", 3 + k, 5] for k in range(3)]
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], rows)
    once = build_dataset(read_log(path), SampleOptions(min_count=1))
    twice = build_dataset(read_log(path), SampleOptions(min_count=2))
    assert "rare-u" in once.item_table.items.tokens
    assert "rare-u" not in twice.item_table.items.tokens
    assert twice.item_table.items.tokens[0] == "common"  # most frequent first
    log = read_log(path)
    candidates = {log.item_ids[int(e)]: int(c)
                  for e, c in zip(twice.train.events, twice.train.candidate_items, strict=True)}
    assert candidates["rare-u"] == OOV_INDEX
    assert candidates["common"] >= FIRST_TOKEN_INDEX


def test_vocabularies_come_from_the_training_split_only(
    movielens_slice: tuple[InteractionLog, Dataset],
) -> None:
    log, data = movielens_slice
    train_items = {log.item_ids[e] for e in data.train.events.tolist()}
    assert set(data.item_table.items.tokens) == train_items


def test_multi_valued_categories(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "category",
                                            "label"], [
        ["u", "a", 1, "Drama|Comedy|War", 1], ["u", "b", 2, "Drama", 0],
        ["u", "c", 3, "", 1], ["u", "a", 4, "Drama|Comedy|War", 1], ["u", "b", 5, "", 0],
    ] + [["v", "a", 1, "Drama|Comedy|War", 1], ["v", "b", 2, "Drama", 1]])
    data = build_dataset(read_log(path), SampleOptions(max_categories=2))
    table = dict(zip(data.item_table.items.tokens, data.item_table.item_categories, strict=True))
    assert table["a"] == ["Drama", "Comedy"]  # at most max_categories, file order
    assert table["b"] == ["Drama"]
    index = {t: i + FIRST_TOKEN_INDEX for i, t in enumerate(data.categories.tokens)}
    row = data.train.candidate_categories[data.train.candidate_items == FIRST_TOKEN_INDEX
                                          + data.item_table.items.tokens.index("a")][0]
    assert row.tolist() == [index["Drama"], index["Comedy"]]
    assert data.train.candidate_categories.shape[1] == 2


def test_movielens_genres(movielens_slice: tuple[InteractionLog, Dataset]) -> None:
    log, data = movielens_slice
    assert log.item_categories["1"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    table = dict(zip(data.item_table.items.tokens, data.item_table.item_categories, strict=True))
    assert table["1"] == ["Adventure", "Animation", "Children", "Comedy"]  # C = 4
    assert "(no genres listed)" not in data.categories.tokens


# -- labelled and implicit logs ----------------------------------------------------------------


def test_label_logs_use_only_positive_events_as_behaviours(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "label"], [
        ["u", "a", 1, 1], ["u", "b", 2, 0], ["u", "a", 3, 1], ["u", "c", 4, 1], ["u", "b", 5, 0],
        ["u", "d", 6, 1], ["u", "a", 7, 0], ["u", "c", 8, 1], ["u", "d", 9, 1], ["u", "a", 10, 1],
    ])
    log = read_log(path)
    data = build_dataset(log, SampleOptions(max_history_length=10))
    for _, split in all_samples(data):
        for s in range(len(split)):
            event = int(split.events[s])
            expected = [i for i in range(len(log)) if log.timestamps[i] < log.timestamps[event]
                        and log.labels is not None and log.labels[i] == 1]
            real = split.history_items[s][split.history_items[s] != PADDING_INDEX]
            assert len(real) == len(expected)
    assert [h.items for h in log.histories()] == [["a", "d", "c", "d", "c", "a", "a"]]


def test_implicit_log_gets_sampled_negatives_the_user_never_touched(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows: list[list[object]] = []
    for u in range(20):
        items = rng.choice(40, size=12, replace=False)
        rows += [[f"u{u}", f"item{i}", t, "g" + str(i % 3)] for t, i in enumerate(items)]
    path = write_csv(tmp_path / "clicks.csv", ["user_id", "item_id", "timestamp", "category"], rows)
    log = read_log(path)
    data = build_dataset(log, SampleOptions(negatives=2, seed=7))
    touched: dict[str, set[str]] = {}
    for user_id, item_id in zip(log.user_ids, log.item_ids, strict=True):
        touched.setdefault(user_id, set()).add(item_id)
    negatives = 0
    for _, split in all_samples(data):
        assert (split.labels == 0).sum() == 2 * (split.labels == 1).sum()
        for s in np.flatnonzero(split.labels == 0).tolist():
            user = log.user_ids[int(split.events[s])]
            item = int(split.candidate_items[s])
            if item != OOV_INDEX:
                assert raw_items(data, np.array([item]))[0] not in touched[user]
            negatives += 1
        # a negative shares its positive's history and user
        for s in np.flatnonzero(split.labels == 0).tolist():
            positive = np.flatnonzero((split.events == split.events[s]) & (split.labels == 1))
            assert len(positive) == 1
            np.testing.assert_array_equal(split.history_items[s], split.history_items[positive[0]])
            assert split.users[s] == split.users[positive[0]]
    assert negatives == 2 * len(log)
    again = build_dataset(read_log(path), SampleOptions(negatives=2, seed=7))
    np.testing.assert_array_equal(again.train.candidate_items, data.train.candidate_items)
    assert data.label_rule.startswith("implicit")


# -- generic logs, features, formats, errors ---------------------------------------------------


FEATURE_ROWS: list[list[object]] = [
    [u, f"m{(u * 7 + k) % 15}", 1000 + k, 1 if (u + k) % 3 else 0, "old" if u % 2 else "young",
     "mobile" if k % 2 else "web", "A|B" if k % 4 == 0 else "C"]
    for u in range(8) for k in range(12)
]
FEATURE_HEADER = ["user_id", "item_id", "timestamp", "label", "age", "device", "category"]


def test_generic_csv_with_user_and_context_columns(tmp_path: Path) -> None:
    rows = [list(r) for r in FEATURE_ROWS]
    rows[5][4] = ""  # a missing profile value is padding
    path = write_csv(tmp_path / "log.csv", FEATURE_HEADER, rows)
    log = read_log(path, user_columns=["age"], context_columns=["device"])
    data = build_dataset(log)
    assert data.train.user_features.shape == (len(data.train), 1)
    assert data.train.context_features.shape == (len(data.train), 1)
    assert set(data.user_features["age"].tokens) == {"old", "young"}
    assert set(data.context_features["device"].tokens) == {"mobile", "web"}
    device = data.context_features["device"]
    for _, split in all_samples(data):
        for s in range(len(split)):
            event = int(split.events[s])
            raw = log.context_columns["device"][event]
            assert split.context_features[s, 0] == device.index(raw)
    row5 = np.flatnonzero(data.train.events == 5)
    assert data.train.user_features[row5, 0].tolist() == [PADDING_INDEX]


def test_parquet_log_reads_like_the_same_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {name: [r[j] for r in FEATURE_ROWS] for j, name in enumerate(FEATURE_HEADER)}
    table = pa.table({
        "user_id": pa.array(columns["user_id"], pa.int64()),  # numeric ids -> decimal text
        "item_id": pa.array(columns["item_id"]),
        "timestamp": pa.array(columns["timestamp"], pa.int64()),
        "label": pa.array(columns["label"], pa.int8()),
        "age": pa.array(columns["age"]),
        "device": pa.array(columns["device"]),
        "category": pa.array(columns["category"]),
    })
    pq.write_table(table, tmp_path / "log.parquet")
    csv_path = write_csv(tmp_path / "log.csv", FEATURE_HEADER, FEATURE_ROWS)
    from_parquet = build_dataset(
        read_log(tmp_path / "log.parquet", user_columns=["age"], context_columns=["device"]))
    from_csv = build_dataset(read_log(csv_path, user_columns=["age"], context_columns=["device"]))
    assert read_log(tmp_path / "log.parquet").format == "parquet"
    for (name, a), (_, b) in zip(all_samples(from_parquet), all_samples(from_csv), strict=True):
        for key, value in a.arrays().items():
            np.testing.assert_array_equal(value, b.arrays()[key], err_msg=f"{name} {key}")
        np.testing.assert_array_equal(a.labels, b.labels)
    assert from_parquet.item_table.items.tokens == from_csv.item_table.items.tokens


def test_iso_timestamps(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp"], [
        ["u", "a", "2024-01-01T00:00:00"], ["u", "b", "2024-01-01T00:00:01Z"],
    ])
    assert read_log(path).timestamps.tolist() == [1704067200.0, 1704067201.0]


def test_missing_column_names_the_column_and_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "time"], [["u", "a", 1]])
    with pytest.raises(ValueError, match=r"log\.csv: missing column 'timestamp'"):
        read_log(path)
    ok = write_csv(tmp_path / "ok.csv", ["user_id", "item_id", "timestamp"], [["u", "a", 1]])
    with pytest.raises(ValueError, match="missing column 'age'"):
        read_log(ok, user_columns=["age"])


def test_bad_value_names_the_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], [
        ["u", "a", 1, 5], ["u", "b", "yesterday", 4],
    ])
    with pytest.raises(ValueError, match=r"log\.csv, line 3: timestamp 'yesterday'"):
        read_log(path)
    labels = write_csv(tmp_path / "labels.csv", ["user_id", "item_id", "timestamp", "label"], [
        ["u", "a", 1, 1], ["u", "b", 2, 0], ["u", "c", 3, 2],
    ])
    with pytest.raises(ValueError, match=r"line 4: label '2' is not 0 or 1"):
        read_log(labels)
    empty = write_csv(tmp_path / "empty.csv", ["user_id", "item_id", "timestamp"], [["", "a", 1]])
    with pytest.raises(ValueError, match="line 2: empty user_id"):
        read_log(empty)


def test_format_detection(tmp_path: Path) -> None:
    assert detect_format(MOVIELENS) == "movielens"
    assert detect_format(tmp_path / "x.csv") == "csv"
    assert detect_format(tmp_path / "x.parquet") == "parquet"
    assert detect_format(tmp_path / "x.data", "csv") == "csv"
    with pytest.raises(ValueError, match="--format"):
        detect_format(tmp_path / "x.data")
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "absent.csv")


def test_histories_for_the_redis_loader(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "age"], [
        ["u", "a", 3, "30"], ["v", "x", 1, "20"], ["u", "b", 1, "29"], ["u", "c", 2, "29"],
    ])
    histories = list(read_log(path, user_columns=["age"]).histories(max_length=2))
    assert [h.user_id for h in histories] == ["u", "v"]
    assert histories[0].items == ["a", "c"]  # newest first, capped
    assert histories[0].profile == {"age": "30"}  # the latest event's value
    assert histories[1].items == ["x"]


# -- protocols, negative samplers, behaviour types ----------------------------------------------


def sparse_rows(users: int, events: int, catalogue: int, seed: int, zipf: float = 0.0,
                ) -> list[list[object]]:
    """Events whose items carry no signal: drawn per event from one distribution for everyone.

    zipf = 0 draws items uniformly from a catalogue large enough that most are seen once; zipf > 0
    draws them with weight rank^-zipf (a long tail with a few popular items).
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, catalogue + 1) ** zipf
    weights /= weights.sum()
    rows: list[list[object]] = []
    for u in range(users):
        items = rng.choice(catalogue, size=events, p=weights)
        rows += [[f"u{u}", f"i{i}", 1000 + t, f"c{i % 17}"] for t, i in enumerate(items)]
    return rows


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_being_unknown_says_nothing_about_the_label(tmp_path: Path, sampler: str) -> None:
    # Most items occur once, so most valid/test items are out of vocabulary. A negative drawn from
    # its positive's own split is unknown as often as the positives of that split.
    rows = sparse_rows(users=300, events=20, catalogue=40_000, seed=3)
    path = write_csv(tmp_path / "sparse.csv", ["user_id", "item_id", "timestamp", "category"], rows)
    data = build_dataset(read_log(path), SampleOptions(negatives=1, seed=5,
                                                       negative_sampler=sampler))
    assert not np.any(data.train.candidate_items == OOV_INDEX)  # training never sees "unknown"
    for split in (data.valid, data.test):
        unknown = split.candidate_items == OOV_INDEX
        positive = split.labels == 1
        rate_pos, rate_neg = unknown[positive].mean(), unknown[~positive].mean()
        assert rate_pos > 0.8  # the premise: a sparse catalogue
        assert abs(rate_pos - rate_neg) < 0.05, (rate_pos, rate_neg)


def test_popularity_negatives_follow_the_positives_and_uniform_ones_do_not(
    tmp_path: Path,
) -> None:
    rows = sparse_rows(users=400, events=6, catalogue=500, seed=4, zipf=1.0)
    path = write_csv(tmp_path / "tail.csv", ["user_id", "item_id", "timestamp", "category"], rows)
    log = read_log(path)

    def head_share(sampler: str) -> tuple[float, float]:
        """Shares of positives and of negatives that are one of the 20 most frequent positives."""
        train = build_dataset(log, SampleOptions(seed=2, negative_sampler=sampler)).train
        positive = train.labels == 1
        head = np.argsort(np.bincount(train.candidate_items[positive]))[-20:]
        in_head = np.isin(train.candidate_items, head)
        return float(in_head[positive].mean()), float(in_head[~positive].mean())

    positives, popular = head_share("popularity")
    _, uniform = head_share("uniform")
    # Popularity negatives land on the head about as often as positives do (less the users who
    # interacted with those items themselves); uniform ones hardly ever (20 of ~500 items).
    assert positives > 0.4
    assert popular > 0.6 * positives, (positives, popular)
    assert uniform < 0.25 * popular, (uniform, popular)


def test_implicit_protocol_ignores_ratings(movielens_slice: tuple[InteractionLog, Dataset]) -> None:
    log, explicit = movielens_slice
    implicit = build_dataset(log, SampleOptions(max_history_length=20, protocol="implicit"))
    assert implicit.label_rule.startswith("implicit")
    sizes = {name: len(s) for name, s in implicit.splits().items()}
    assert sum(sizes.values()) == 2 * len(log)  # every rating a positive, one negative each
    for split in implicit.splits().values():
        assert split.labels.mean() == pytest.approx(0.5)
    # Histories are every earlier rating in both protocols (a rating means the user watched).
    np.testing.assert_array_equal(implicit.test.history_items[implicit.test.labels == 1],
                                  explicit.test.history_items)


def test_explicit_protocol_needs_labels_or_ratings(tmp_path: Path) -> None:
    rows = sparse_rows(users=5, events=6, catalogue=50, seed=0)
    path = write_csv(tmp_path / "clicks.csv", ["user_id", "item_id", "timestamp", "category"], rows)
    with pytest.raises(ValueError, match="--protocol implicit"):
        build_dataset(read_log(path), SampleOptions(protocol="explicit"))


BEHAVIOR_HEADER = ["user_id", "item_id", "category", "behavior", "timestamp", "price"]


def behavior_log(tmp_path: Path) -> Path:
    rng = np.random.default_rng(9)
    kinds = ["pv", "pv", "pv", "cart", "fav", "buy"]
    rows = [[f"u{u}", f"i{rng.integers(60)}", f"c{rng.integers(5)}", kinds[rng.integers(6)],
             1000 + t, "9.99"] for u in range(40) for t in range(25)]
    return write_csv(tmp_path / "taobao.csv", BEHAVIOR_HEADER, rows)


def test_unused_columns_are_named(tmp_path: Path) -> None:
    path = behavior_log(tmp_path)
    assert read_log(path).ignored_columns == ("behavior", "price")
    assert read_log(path, behavior_column="behavior").ignored_columns == ("price",)
    assert read_log(MOVIELENS).ignored_columns == ()


def test_behaviour_types_choose_history_entries_and_positives(tmp_path: Path) -> None:
    log = read_log(behavior_log(tmp_path), behavior_column="behavior")
    options = SampleOptions(max_history_length=10, history_behaviors=("cart", "fav", "buy"),
                            positive_behaviors=("buy",), protocol="implicit")
    data = build_dataset(log, options)
    assert log.behaviors is not None
    kinds = np.array(log.behaviors)
    for split in data.splits().values():
        assert set(kinds[split.events]) == {"buy"}  # only buys are targets
    positions = {  # (user, item index) pairs of the history-eligible events
        (log.user_ids[i], data.item_table.items.index(log.item_ids[i]))
        for i in range(len(log)) if kinds[i] in ("cart", "fav", "buy")
    }
    entries = 0
    for split in data.splits().values():
        for s in range(len(split)):
            user = log.user_ids[int(split.events[s])]
            for item in split.history_items[s][split.history_items[s] != 0].tolist():
                assert (user, item) in positions  # no page view in any history
                entries += 1
    assert entries > 0
    with pytest.raises(ValueError, match="do not occur"):
        build_dataset(log, SampleOptions(positive_behaviors=("purchase",), protocol="implicit"))
    with pytest.raises(ValueError, match="no behaviour-type column"):
        build_dataset(read_log(behavior_log(tmp_path)),
                      SampleOptions(history_behaviors=("buy",), protocol="implicit"))
