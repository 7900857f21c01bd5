"""Vocabularies: raw string ids <-> embedding indices, and their on-disk TSV form.

Index 0 is padding, 1 is out-of-vocabulary, real tokens start at 2 (docs/bundle.md). The same files
travel from the training run into the bundle unchanged: the trainer writes them, the exporter
copies them, the service parses them from the bundle's checksummed bytes (service/bundle.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PADDING_INDEX = 0
OOV_INDEX = 1
FIRST_TOKEN_INDEX = 2
FORBIDDEN = ("\t", "\n", "\r")


@dataclass
class Vocabulary:
    """An ordered list of raw tokens; token i has index i + FIRST_TOKEN_INDEX."""

    tokens: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for token in self.tokens:
            if token == "" or any(ch in token for ch in FORBIDDEN):
                raise ValueError(f"vocabulary token {token!r} is empty or holds a tab/newline")
        self._index = {t: i + FIRST_TOKEN_INDEX for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, values: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Tokens seen at least min_count times, most frequent first (ties by first sight)."""
        counts = Counter(values)
        kept = [t for t, c in counts.most_common() if c >= min_count and t != ""]
        return cls(kept)

    @property
    def size(self) -> int:
        """Embedding table rows: the tokens plus padding and OOV."""
        return len(self.tokens) + FIRST_TOKEN_INDEX

    def index(self, token: str) -> int:
        return self._index.get(token, OOV_INDEX)

    def indices(self, tokens: Sequence[str]) -> list[int]:
        get = self._index.get
        return [get(t, OOV_INDEX) for t in tokens]

    def save(self, path: Path) -> None:
        path.write_text("".join(t + "\n" for t in self.tokens), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls.parse(path.read_text(encoding="utf-8"))

    @classmethod
    def parse(cls, text: str) -> Vocabulary:
        """A vocabulary file's content: one token per line."""
        return cls([line for line in text.split("\n") if line != ""])


@dataclass
class ItemTable:
    """The item vocabulary plus each item's categories (raw names, at most max_categories)."""

    items: Vocabulary
    item_categories: list[list[str]]  # aligned with items.tokens

    def __post_init__(self) -> None:
        if len(self.item_categories) != len(self.items.tokens):
            raise ValueError("one category list per item")

    def save(self, path: Path) -> None:
        lines = (
            f"{item}\t{'|'.join(cats)}\n"
            for item, cats in zip(self.items.tokens, self.item_categories, strict=True)
        )
        path.write_text("".join(lines), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ItemTable:
        return cls.parse(path.read_text(encoding="utf-8"))

    @classmethod
    def parse(cls, text: str) -> ItemTable:
        """items.tsv's content: `<item>\t<cat>|<cat>` per line."""
        items: list[str] = []
        categories: list[list[str]] = []
        for line in text.split("\n"):
            if line == "":
                continue
            item, _, cats = line.partition("\t")
            items.append(item)
            categories.append([c for c in cats.split("|") if c])
        return cls(Vocabulary(items), categories)

    def category_matrix(self, categories: Vocabulary, max_categories: int) -> list[list[int]]:
        """Rows indexed by item index (padding and OOV rows are all 0), C columns, 0-padded."""
        rows = [[PADDING_INDEX] * max_categories for _ in range(FIRST_TOKEN_INDEX)]
        for cats in self.item_categories:
            ids = categories.indices(cats[:max_categories])
            rows.append(ids + [PADDING_INDEX] * (max_categories - len(ids)))
        return rows
