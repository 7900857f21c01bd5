"""The model bundle: the one contract between the offline exporter and the service.

A bundle is a directory `models/<name>/<version>/` holding `manifest.json`, the ONNX graph and the
vocabulary files (docs/bundle.md). This module owns all of it: the file and tensor names, the
typed Manifest (its one writer, write_manifest, and its one reader, read_manifest), the rule that
finds a model's versions, and open_bundle(), which returns a Bundle whose files have been checked
against the manifest's sha256 sums. The service serves the format it owns, as a model repository
does; the exporter writes through it. It imports neither torch, onnx, onnxruntime nor FastAPI.

Format versions: 1 (no `architecture`, always a DIN) and 2 (`architecture` names the model family
and `config` holds that family's settings) are read; 2 is written. Any other version is refused
with a message that says which versions this release reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from service.vocab import ItemTable, Vocabulary

MODEL_FILE = "model.onnx"
NAIVE_FILE = "model_naive.onnx"
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.tsv"
CATEGORIES_FILE = "categories.tsv"
BUNDLE_FORMAT: Literal["dinserve-bundle"] = "dinserve-bundle"
BUNDLE_FORMAT_VERSION = 2  # the version written
READABLE_FORMAT_VERSIONS = (1, 2)
ARCHITECTURES = ("din",)  # model families a bundle may declare; the service serves these

# The serving graph's inputs (int64) and its output (float32, one score per candidate).
HISTORY_ITEMS = "history_items"  # (L,)
HISTORY_CATEGORIES = "history_categories"  # (L, C)
CANDIDATE_ITEMS = "candidate_items"  # (N,)
CANDIDATE_CATEGORIES = "candidate_categories"  # (N, C)
USER_FEATURES = "user_features"  # (U,), only in a model trained with user features
CONTEXT_FEATURES = "context_features"  # (X,), only in a model trained with context features
# Optional, with a default in the graph: the largest pair tensor of one chunk of the
# channel-major Scan over the history, in floats (docs/bundle.md).
CHUNK_INPUT = "chunk_floats"
OUTPUT = "ctr"  # (N,)


class BundleError(Exception):
    """A directory is not a usable bundle; the message names the path and the reason."""


# ----------------------------------------------------------------------------------------------
# The manifest


class _Part(BaseModel):
    # Unknown keys are kept, not refused: a bundle written by a newer exporter of the same format
    # version may carry extra information that this reader has no use for.
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Part):
    """One graph input or output: shape dims are sizes or symbolic letters (N, L)."""

    name: str
    dtype: Literal["int64", "float32"]
    shape: list[int | str]


class FileEntry(_Part):
    sha256: str
    bytes: int | None = None


class VocabularyEntry(_Part):
    file: str
    size: int  # vocabulary lines + 2 (padding and OOV): the embedding table's rows


class FeatureEntry(_Part):
    name: str
    vocabulary: str  # file name
    size: int


class Features(_Part):
    user: list[FeatureEntry] = Field(default_factory=list)
    context: list[FeatureEntry] = Field(default_factory=list)


class Vocabularies(_Part):
    items: VocabularyEntry
    categories: VocabularyEntry


class GoldenCase(_Part):
    """Index-level graph inputs (nested lists in the graph's shapes) and the expected scores."""

    name: str = ""
    inputs: dict[str, list[Any]]
    ctr: list[float]


class Golden(_Part):
    tolerance: float = 1e-5
    cases: list[GoldenCase]

    @field_validator("cases")
    @classmethod
    def _some(cls, cases: list[GoldenCase]) -> list[GoldenCase]:
        if not cases:  # the service's load-time self-check needs at least one
            raise ValueError("no golden cases to self-check")
        return cases


class Conventions(_Part):
    padding_index: int = 0
    oov_index: int = 1
    first_token_index: int = 2


class OnnxInfo(_Part):
    opset: int | None = None
    graph: str = "serving"
    naive: str | None = None  # the tiled graph's file, when the bundle has one
    switch: dict[str, Any] | None = None  # how the serving graph splits by N (switch.py)
    producer: str | None = None


class Manifest(_Part):
    """manifest.json, typed. Field by field in docs/bundle.md."""

    format: Literal["dinserve-bundle"] = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    architecture: str = "din"  # format 1 has no such key: every version-1 bundle is a DIN
    name: str
    version: str
    created_at: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the family's own settings
    conventions: Conventions = Field(default_factory=Conventions)
    max_history_length: PositiveInt
    max_categories: PositiveInt
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    features: Features = Field(default_factory=Features)
    vocabularies: Vocabularies
    files: dict[str, FileEntry]
    metrics: dict[str, Any] = Field(default_factory=dict)
    golden: Golden
    onnx: OnnxInfo = Field(default_factory=OnnxInfo)

    @property
    def preset(self) -> str | None:
        """The training preset, for the DIN family (docs/model.md); None when there is none."""
        preset = self.config.get("preset")
        return None if preset is None else str(preset)

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write manifest.json into directory: the one writer (`dinserve export` calls it)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    (directory / MANIFEST_FILE).write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> Manifest:
    """The directory's manifest.json, typed; BundleError naming the file and the problem."""
    path = directory / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    # The format is checked first, on its own: a manifest of another format or a newer version
    # fails with that reason, not with a list of fields this reader does not know.
    if raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: format {raw.get('format')!r}, expected {BUNDLE_FORMAT!r}: not a dinserve "
            f"bundle (export one with `dinserve export`)"
        )
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
        newer = isinstance(version, int) and version > max(READABLE_FORMAT_VERSIONS)
        hint = "; upgrade dinserve to serve it" if newer else ""
        raise BundleError(
            f"{path}: format_version {version!r}; this release reads versions {readable}{hint}"
        )
    if version == 1 and "architecture" in raw:
        raise BundleError(f"{path}: format_version 1 has no 'architecture'; it must say 2")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"{path}: invalid manifest: {problems}") from exc
    if manifest.architecture not in ARCHITECTURES:
        raise BundleError(
            f"{path}: architecture {manifest.architecture!r}; this release serves "
            f"{', '.join(ARCHITECTURES)}"
        )
    return manifest


# ----------------------------------------------------------------------------------------------
# Files


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """manifest.files for the files already in directory: every file but manifest.json."""
    entries = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            data = path.read_bytes()
            entries[path.name] = FileEntry(sha256=sha256_hex(data), bytes=len(data))
    return entries


@dataclass(frozen=True)
class Bundle:
    """A bundle whose listed files all matched their sha256 and size when it was opened.

    The files' bytes are kept, so that what was checked is what gets served: the ONNX session is
    built from `model_bytes`, and the vocabularies are parsed from their verified text.
    """

    directory: Path
    manifest: Manifest
    files: dict[str, bytes]

    @property
    def model_bytes(self) -> bytes:
        return self.files[MODEL_FILE]

    def text(self, name: str) -> str:
        """A listed file's verified content as UTF-8 text."""
        if name not in self.files:
            raise BundleError(
                f"{self.directory}: {name} is used but not checksummed in manifest.files"
            )
        return self.files[name].decode("utf-8")

    def item_table(self) -> ItemTable:
        return ItemTable.parse(self.text(self.manifest.vocabularies.items.file))

    def categories(self) -> Vocabulary:
        return Vocabulary.parse(self.text(self.manifest.vocabularies.categories.file))

    def feature_vocabulary(self, entry: FeatureEntry) -> Vocabulary:
        return Vocabulary.parse(self.text(entry.vocabulary))


def open_bundle(directory: Path) -> Bundle:
    """Read the manifest and every file it lists, checking each one's sha256 and size."""
    manifest = read_manifest(directory)
    if MODEL_FILE not in manifest.files:
        raise BundleError(
            f"{directory}: manifest.files must list {MODEL_FILE} and every other file"
        )
    files: dict[str, bytes] = {}
    for name, entry in manifest.files.items():
        if Path(name).name != name:
            raise BundleError(
                f"{directory}: manifest lists {name!r}, which is not a plain file name"
            )
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: listed in the manifest but unreadable: {exc}") from exc
        digest = sha256_hex(data)
        if digest != entry.sha256 or (entry.bytes is not None and entry.bytes != len(data)):
            raise BundleError(
                f"{path}: does not match the manifest: sha256 {digest} ({len(data)} bytes), "
                f"manifest says sha256 {entry.sha256} ({entry.bytes} bytes)"
            )
        files[name] = data
    return Bundle(directory, manifest, files)


# ----------------------------------------------------------------------------------------------
# Finding versions


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


def resolve_bundle(path: Path) -> Path:
    """A bundle dir, a model-name dir (its latest version) or a models root holding one model."""
    if (path / MANIFEST_FILE).is_file():
        return path
    if not path.is_dir():
        raise BundleError(f"{path}: no such directory (set CTR_MODEL_DIR or --model-dir)")
    versions = version_dirs(path)
    if versions:
        return versions[-1][1]
    names = sorted(child for child in path.iterdir() if version_dirs(child))
    if len(names) == 1:
        return version_dirs(names[0])[-1][1]
    if names:
        listed = ", ".join(n.name for n in names)
        raise BundleError(f"{path} holds several models ({listed}); point the model dir at one")
    raise BundleError(
        f"{path}: no model bundle found (looked for {MANIFEST_FILE}, <version>/{MANIFEST_FILE}"
        f" and <name>/<version>/{MANIFEST_FILE}); export one with `dinserve export`"
    )
