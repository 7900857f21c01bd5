"""The names a bundle is made of: written by the exporter, read by the service (docs/bundle.md).

One spelling for both sides, so a rename cannot leave the service looking for what the exporter no
longer writes. Torch-free and onnx-free: the service imports it, like model_export.vocab.
"""

from __future__ import annotations

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
