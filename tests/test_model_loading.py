"""service/model.py: finding, verifying, self-checking and running a real exported bundle."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import CHUNK_INPUT, read_manifest
from service.config import Settings, cgroup_cpu_quota, usable_cores
from service.errors import BundleRejected, InferenceFailed
from service.features import FeatureSpace
from service.model import (
    CTRModel,
    inference_pool,
    locate_bundle,
    session_options,
)

SETTINGS = Settings(warmup_runs=1)


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(bundle: Path) -> None:
    """Make manifest.files true again after a deliberate file swap."""

    def update(manifest: dict[str, Any]) -> None:
        for name in manifest["files"]:
            data = (bundle / name).read_bytes()
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)}

    edit_manifest(bundle, update)


def rejected(bundle: Path, settings: Settings = SETTINGS) -> str:
    with pytest.raises(BundleRejected) as info:
        CTRModel.load(bundle, settings)
    assert str(bundle) in info.value.message or bundle.name in info.value.message
    return info.value.message


def test_tiny_bundle_loads_self_checks_and_describes_itself(tiny_bundle: Path) -> None:
    model = CTRModel.load(tiny_bundle, SETTINGS)
    assert model.directory == tiny_bundle
    assert model.version == tiny_bundle.name
    assert model.has_user_features
    assert model.self_check is not None
    assert model.self_check.cases >= 2
    assert model.self_check.max_abs_diff <= model.self_check.tolerance
    summary = model.summary()
    assert summary["features"] == {"user": ["age_bucket"], "context": ["device"]}
    assert summary["max_history_length"] == 20 and summary["max_categories"] == 3
    assert {i["name"] for i in summary["inputs"]} == set(model.input_names)


def request_feeds(space: FeatureSpace, n: int, seed: int) -> dict[str, np.ndarray]:
    """A request's feeds for this feature space: a full random history, n random candidates."""
    rng = np.random.default_rng(seed)
    history = rng.integers(2, space.items.size, space.max_history_length)
    candidates = rng.integers(2, space.items.size, n)
    return {
        "history_items": history,
        "history_categories": space.item_categories[history],
        "candidate_items": candidates,
        "candidate_categories": space.item_categories[candidates],
        "user_features": np.zeros(len(space.user_features), dtype=np.int64),
        "context_features": np.zeros(len(space.context_features), dtype=np.int64),
    }


def test_more_than_one_intra_op_thread_feeds_the_whole_history_as_one_chunk(
    tiny_bundle: Path,
) -> None:
    """The chunked graph's chunk size (model_export/chunked.py) is left at its default on one
    thread and set to the whole history on several; the scores are the same either way (and the
    golden self-check ran through the same feeds)."""
    one = CTRModel.load(tiny_bundle, Settings(warmup_runs=0, ort_intra_op_threads=1))
    two = CTRModel.load(tiny_bundle, Settings(warmup_runs=0, ort_intra_op_threads=2))
    assert one.fixed_feeds == {}
    assert set(two.fixed_feeds) == {CHUNK_INPUT}
    assert two.self_check is not None and two.self_check.max_abs_diff <= two.self_check.tolerance
    feeds = request_feeds(one.space, 200, seed=3)  # 200: the chunked branch (above 48)
    np.testing.assert_allclose(two.predict(feeds), one.predict(feeds), rtol=0, atol=1e-6)


def test_inference_threads_default_to_one_call_per_core() -> None:
    cores = usable_cores()
    assert Settings(ort_intra_op_threads=1).inference_thread_count == cores
    assert Settings(ort_intra_op_threads=2).inference_thread_count == max(1, cores // 2)
    assert Settings(ort_intra_op_threads=0).inference_thread_count == 1  # 0: all cores per call
    assert Settings(ort_intra_op_threads=4 * cores).inference_thread_count == 1
    assert Settings(inference_threads=3).inference_thread_count == 3


def test_workers_share_the_cores_between_their_inference_threads() -> None:
    cores = usable_cores()
    assert Settings(workers=2).inference_thread_count == max(1, cores // 2)
    assert Settings(workers=cores).inference_thread_count == 1
    assert Settings(workers=4 * cores).inference_thread_count == 1  # at least one each
    assert Settings(workers=2, ort_intra_op_threads=2).inference_thread_count == max(1, cores // 4)
    assert Settings(workers=2, inference_threads=3).inference_thread_count == 3  # explicit wins


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker run --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "0\n"}, None),
        ({}, None),  # no cgroup files: not Linux, or not mounted
    ],
)
def test_a_cgroup_cpu_quota_caps_the_usable_cores(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    affinity = len(os.sched_getaffinity(0))
    want = affinity if quota is None else min(affinity, max(1, int(quota)))
    assert usable_cores(tmp_path) == want


def test_a_quota_below_one_cpu_still_leaves_one_core(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("20000 100000\n")  # --cpus 0.2
    assert cgroup_cpu_quota(tmp_path) == pytest.approx(0.2)
    assert usable_cores(tmp_path) == 1


def test_graph_calls_beyond_the_inference_threads_wait_and_can_be_dropped(
    tiny_bundle: Path,
) -> None:
    """With every inference thread busy, a call waits in the pool's queue (it does not get a
    thread of its own), its request can be cancelled at once (a deadline does not wait for the
    busy thread), and the next call runs as soon as the thread is free, with the right scores."""
    model = CTRModel.load(tiny_bundle, Settings(warmup_runs=0))
    feeds = request_feeds(model.space, 60, seed=5)
    expected = model.predict(feeds)
    threads = inference_pool(Settings(inference_threads=1))
    release = threading.Event()
    cpu_seconds: list[float] = []

    async def scenario() -> np.ndarray:
        busy = asyncio.get_running_loop().run_in_executor(threads, release.wait, 30)
        dropped = asyncio.create_task(model.score(feeds, threads, cpu_seconds=cpu_seconds.append))
        queued = asyncio.create_task(model.score(feeds, threads, cpu_seconds=cpu_seconds.append))
        done, _ = await asyncio.wait({dropped, queued}, timeout=0.3)
        assert not done  # both wait behind the busy thread
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(dropped, timeout=5)  # while the thread is still busy
        assert not release.is_set() and not queued.done()
        release.set()
        assert await busy
        return await asyncio.wait_for(queued, timeout=30)

    try:
        scores = asyncio.run(scenario())
    finally:
        release.set()
        threads.shutdown(wait=True)
    np.testing.assert_array_equal(scores, expected)
    assert len(cpu_seconds) == 1 and cpu_seconds[0] > 0  # the dropped call never ran


def test_plain_bundle_has_only_the_four_sequence_inputs(plain_bundle: Path) -> None:
    model = CTRModel.load(plain_bundle, SETTINGS)
    assert set(model.input_names) == {
        "history_items", "history_categories", "candidate_items", "candidate_categories",
    }
    assert not model.has_user_features


def test_latest_integer_version_wins_from_name_dir_or_models_root(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    name_dir = tmp_path / "models" / "din-paper"
    for version in ("2", "10"):
        copy_bundle(tiny_bundle, name_dir / version)
    (name_dir / "11").mkdir()  # no manifest yet: an export in progress, not a bundle
    copy_bundle(tiny_bundle, name_dir / "latest")  # not an integer: never a version
    assert locate_bundle(name_dir) == name_dir / "10"  # numeric, not lexicographic
    assert locate_bundle(tmp_path / "models") == name_dir / "10"
    assert locate_bundle(name_dir / "2") == name_dir / "2"
    assert CTRModel.load(tmp_path / "models", SETTINGS).version == "10"


def test_a_bundle_copied_to_a_new_number_is_served_under_it_with_a_warning(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exported = json.loads((tiny_bundle / "manifest.json").read_text())["version"]
    with caplog.at_level(logging.WARNING, logger="service.model"):
        CTRModel.load(tiny_bundle, SETTINGS)
    assert tiny_bundle.name == exported and not caplog.records  # as exported: nothing to say
    republished = copy_bundle(tiny_bundle, tmp_path / "din" / "7")
    with caplog.at_level(logging.WARNING, logger="service.model"):
        model = CTRModel.load(republished, SETTINGS)
    assert model.version == "7"
    assert model.summary()["version"] == "7"
    assert model.summary()["manifest_version"] == exported
    [record] = caplog.records
    assert f"manifest says version {exported}; served as version 7" in record.getMessage()


def test_ambiguous_or_missing_model_dirs_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        copy_bundle(tiny_bundle, tmp_path / "models" / name / "1")
    with pytest.raises(BundleRejected, match="several models"):
        locate_bundle(tmp_path / "models")
    with pytest.raises(BundleRejected, match="no such directory"):
        locate_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleRejected, match="no model bundle found"):
        locate_bundle(tmp_path / "empty")


def test_a_tampered_file_fails_its_checksum(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    with (bundle / "items.tsv").open("a") as f:
        f.write("tt9999999\tDrama\n")
    assert "items.tsv" in rejected(bundle)


def test_a_corrupt_model_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    assert "sha256" in rejected(bundle)
    # Even with matching checksums, a broken graph must not serve. (A flipped byte alone may land
    # in a float's lowest mantissa bits and change no score by 1e-5: truncate instead.)
    (bundle / "model.onnx").write_bytes(bytes(data[: len(data) // 2]))
    rehash(bundle)
    message = rejected(bundle)
    assert "onnxruntime" in message or "model.onnx" in message


def test_wrong_weights_with_matching_checksums_fail_the_self_check(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    model = onnx.load(str(bundle / "model.onnx"))

    def graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:  # the If branches included
        found = [graph]
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    found += graphs(attribute.g)
        return found

    changed = 0
    for graph in graphs(model.graph):
        for init in graph.initializer:
            values = numpy_helper.to_array(init)
            if values.dtype == np.float32 and values.size > 1:
                init.CopyFrom(numpy_helper.from_array(values * 1.5, init.name))
                changed += 1
    assert changed > 0
    onnx.save(model, str(bundle / "model.onnx"))
    rehash(bundle)
    assert "self-check failed" in rejected(bundle)


def test_a_missing_listed_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    (bundle / "feature_device.tsv").unlink()
    assert "feature_device.tsv" in rejected(bundle)


def test_a_wrong_golden_score_fails_the_self_check(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")

    def shift(manifest: dict[str, Any]) -> None:
        manifest["golden"]["cases"][-1]["ctr"][0] += 0.01

    edit_manifest(bundle, shift)
    assert "self-check failed" in rejected(bundle)


def test_a_bundle_without_golden_cases_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    edit_manifest(bundle, lambda m: m["golden"].update(cases=[]))
    assert "no golden cases" in rejected(bundle)


def test_manifest_contract_must_match_the_features(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")

    def drop_context(manifest: dict[str, Any]) -> None:
        manifest["inputs"] = [i for i in manifest["inputs"] if i["name"] != "context_features"]

    edit_manifest(bundle, drop_context)
    assert "context_features" in rejected(bundle)

    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "2")
    edit_manifest(bundle, lambda m: m["inputs"][1].update(shape=["L", 4]))
    assert "history_categories" in rejected(bundle)


def test_the_real_graph_must_match_the_manifest(
    tiny_bundle: Path, plain_bundle: Path, tmp_path: Path
) -> None:
    # tiny's manifest (with user/context inputs) over plain's graph (without): checksums are
    # consistent, the contract is not.
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    shutil.copy(plain_bundle / "model.onnx", bundle / "model.onnx")
    rehash(bundle)
    assert "graph inputs" in rejected(bundle)


def test_vocabulary_size_must_match_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    edit_manifest(bundle, lambda m: m["vocabularies"]["items"].update(size=9999))
    assert "items vocabulary" in rejected(bundle)


def test_settings_must_agree_with_the_manifest(tiny_bundle: Path) -> None:
    assert "max_history_length" in rejected(tiny_bundle, Settings(history_length=50))
    CTRModel.load(tiny_bundle, Settings(history_length=20, warmup_runs=0))


def test_onnxruntime_threads_are_explicit(tiny_bundle: Path) -> None:
    settings = Settings(ort_intra_op_threads=2, ort_inter_op_threads=1,
                        ort_graph_optimization="basic", warmup_runs=0)
    options = session_options(settings)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    model = CTRModel.load(tiny_bundle, settings)
    assert model.session.get_session_options().intra_op_num_threads == 2


def test_onnxruntime_errors_become_inference_failed(tiny_bundle: Path) -> None:
    model = CTRModel.load(tiny_bundle, Settings(warmup_runs=0))
    space: FeatureSpace = model.space
    feeds = {
        "history_items": np.zeros(2, dtype=np.int64),
        "history_categories": np.zeros((2, 3), dtype=np.int64),
        "candidate_items": np.array([2, 3], dtype=np.int64),
        "candidate_categories": np.zeros((2, 3), dtype=np.int64),
        "user_features": np.zeros(len(space.user_features), dtype=np.int64),
        "context_features": np.zeros(3, dtype=np.int64),  # wrong length: X is 1
    }
    with pytest.raises(InferenceFailed):
        model.predict(feeds)
    feeds["context_features"] = np.zeros(1, dtype=np.int64)
    assert model.predict(feeds).shape == (2,)


# ----------------------------------------------------------------------------------------------
# Format versions (service/bundle.py)


def as_format_1(manifest: dict[str, Any]) -> None:
    """What the exporter wrote before format 2: no architecture key."""
    manifest["format_version"] = 1
    del manifest["architecture"]


def test_a_format_1_bundle_still_loads_as_a_din(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    edit_manifest(bundle, as_format_1)
    model = CTRModel.load(bundle, SETTINGS)
    assert model.manifest.format_version == 1
    assert model.summary()["architecture"] == "din"
    assert model.self_check is not None and model.self_check.cases >= 2


def test_the_exporter_writes_format_2_with_the_architecture(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    assert (raw["format_version"], raw["architecture"]) == (2, "din")
    assert read_manifest(tiny_bundle).model_dump(mode="json") == raw  # one writer, one reader


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.update(format_version=3), "format_version 3; this release reads versions "
                                                "1, 2; upgrade dinserve"),
        (lambda m: m.update(format_version="2"), "format_version '2'"),
        (lambda m: m.update(format="onnx-bundle"), "not a dinserve bundle"),
        (lambda m: m.update(architecture="dien-v9"), "architecture 'dien-v9'; this release serves"),
        (lambda m: m.update(architecture="din", format_version=1), "format_version 1 has no"),
        (lambda m: m.pop("max_history_length"), "max_history_length: Field required"),
        (lambda m: m["inputs"][0].update(dtype="int8"), "inputs.0.dtype"),
    ],
    ids=["newer", "string", "foreign", "architecture", "v1-with-architecture", "missing",
         "dtype"],
)
def test_a_manifest_this_release_cannot_read_is_refused_with_the_reason(
    tiny_bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "m" / "1")
    edit_manifest(bundle, edit)
    assert expected in rejected(bundle)
