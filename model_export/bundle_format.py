"""A bundle's names, written by the exporter and read by the service, and the rule that finds its
versions (docs/bundle.md).

One spelling for both sides, so a rename cannot leave the service looking for what the exporter no
longer writes. Torch-free and onnx-free: the service imports it, like model_export.vocab.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "dinserve-bundle"
BUNDLE_FORMAT_VERSION = 1

# The serving graph's inputs (int64) and its output (float32, one score per candidate).
HISTORY_ITEMS = "history_items"  # (L,)
HISTORY_CATEGORIES = "history_categories"  # (L, C)
CANDIDATE_ITEMS = "candidate_items"  # (N,)
CANDIDATE_CATEGORIES = "candidate_categories"  # (N, C)
USER_FEATURES = "user_features"  # (U,), only in a model trained with user features
CONTEXT_FEATURES = "context_features"  # (X,), only in a model trained with context features
# Optional, with a default in the graph: the chunk size of the channel-major scan
# (model_export/chunked.py).
CHUNK_INPUT = "chunk_floats"
OUTPUT = "ctr"  # (N,)


def version_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Positive-integer subdirectories holding a manifest, smallest version first.

    A version without manifest.json is ignored: an exporter still writing it is not a bundle yet.
    """
    if not directory.is_dir():
        return []
    found = [
        (int(child.name), child)
        for child in directory.iterdir()
        if child.name.isdigit() and int(child.name) > 0 and (child / MANIFEST_FILE).is_file()
    ]
    return sorted(found)
