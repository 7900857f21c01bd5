"""The reference Deep Interest Network (Zhou et al., KDD 2018) and its BaseModel.

Reads top to bottom: the frozen DINConfig and its presets, the small blocks (Dice, MLP,
TargetAttention, the embedding tables), then DIN itself. forward() returns logits; the loss lives
in train.py, so what export.py sees is inference-only.

Conventions shared with the bundle and the service (docs/bundle.md):
- index 0 is padding and is masked everywhere; index 1 is out-of-vocabulary; real tokens start at 2;
- an item has up to C categories (multi-valued genres), padded with 0, embedded as their mean;
- attention weights are NOT softmax-normalised by default (paper section 4.3: keep the intensity of
  the user's interest); the optional softmax masks padding before normalising, so scores never
  depend on how much padding a history carries, and an empty history pools to a zero vector.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from service.vocab import FIRST_TOKEN_INDEX, OOV_INDEX, PADDING_INDEX

Activation = Literal["dice", "relu", "prelu", "sigmoid"]


@dataclass(frozen=True)
class SparseFeature:
    """One categorical feature outside the behaviour sequence (user profile or request context)."""

    name: str
    vocab_size: int  # includes padding (0) and out-of-vocabulary (1)


@dataclass(frozen=True)
class DINConfig:
    """Everything needed to rebuild the network; travels with the weights and in manifest.json."""

    preset: str = "paper"
    n_items: int = 1000  # vocabulary sizes include padding and OOV
    n_categories: int = 100
    max_categories: int = 4  # C: categories kept per item
    max_history_length: int = 100  # L cap used in training and serving
    item_dim: int = 32
    category_dim: int = 32
    attention_units: tuple[int, ...] = (80, 40)
    attention_activation: Activation = "dice"
    attention_normalization: Literal["none", "softmax"] = "none"
    mlp_units: tuple[int, ...] = (200, 80)
    mlp_activation: Activation = "dice"
    use_attention: bool = True  # False gives the paper's BaseModel (sum pooling)
    feature_dim: int = 8
    user_features: tuple[SparseFeature, ...] = ()
    context_features: tuple[SparseFeature, ...] = ()
    dice_epsilon: float = 1e-8

    @property
    def embedding_dim(self) -> int:
        """E: width of one behaviour or candidate embedding (item ‖ category)."""
        return self.item_dim + self.category_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DINConfig:
        values = dict(raw)
        for key in ("attention_units", "mlp_units"):
            values[key] = tuple(values[key])
        for key in ("user_features", "context_features"):
            values[key] = tuple(SparseFeature(**f) for f in values.get(key, ()))
        return cls(**values)


# Presets (DESIGN.md). Vocabulary sizes and features are filled in from the data.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's own sizes: activation unit 80 -> 40, MLP 200 -> 80, Dice throughout.
    "paper": dict(
        item_dim=32, category_dim=32, attention_units=(80, 40), attention_activation="dice",
        mlp_units=(200, 80), mlp_activation="dice",
    ),
    # DeepCTR-Torch defaults: embedding 8, attention 64 -> 16 with Dice, DNN 256 -> 128 ReLU.
    "deepctr": dict(
        item_dim=8, category_dim=8, attention_units=(64, 16), attention_activation="dice",
        mlp_units=(256, 128), mlp_activation="relu",
    ),
    # The seed article's simplified Keras variant: one Dense(1) score, masked softmax,
    # MLP 128 -> 64 ReLU.
    "seed": dict(
        item_dim=16, category_dim=16, attention_units=(), attention_activation="relu",
        attention_normalization="softmax", mlp_units=(128, 64), mlp_activation="relu",
    ),
}


def preset_config(name: str, **overrides: Any) -> DINConfig:
    """A DINConfig from a named preset, with data-dependent fields given as overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return DINConfig(preset=name, **{**PRESETS[name], **overrides})


class Dice(nn.Module):
    """Data-adaptive activation (paper section 4.3): p(s)·s + (1 − p(s))·α·s, p = σ(BN(s)).

    At inference BN uses its running statistics, so p(s) = σ(a·s + c) folds to one affine map.
    """

    def __init__(self, dim: int, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=epsilon, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, D) rows of pre-activations -> (R, D)."""
        if self.training and x.shape[0] == 1:
            # One row has no batch statistics (BatchNorm raises); a training batch whose histories
            # hold a single behaviour in total reaches here, so use the running statistics.
            normalized = nn.functional.batch_norm(
                x, self.norm.running_mean, self.norm.running_var, training=False, eps=self.norm.eps
            )
        else:
            normalized = self.norm(x)
        p = torch.sigmoid(normalized)
        return p * x + (1.0 - p) * self.alpha * x

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c) with p(s) = σ(a·s + c) at inference; used by the serving graph."""
        scale = torch.rsqrt(self.norm.running_var + self.norm.eps)  # type: ignore[operator, arg-type]
        return scale, -self.norm.running_mean * scale  # type: ignore[operator]


def make_activation(kind: Activation, dim: int, epsilon: float) -> nn.Module:
    if kind == "dice":
        return Dice(dim, epsilon)
    if kind == "prelu":
        return nn.PReLU(dim)
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {kind!r}")


class MLP(nn.Module):
    """Linear -> activation blocks; the last hidden layer feeds an optional Linear(·, 1) head."""

    def __init__(
        self, in_dim: int, units: tuple[int, ...], activation: Activation, epsilon: float,
        head: bool,
    ) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = in_dim
        for out in units:
            self.linears.append(nn.Linear(width, out))
            self.activations.append(make_activation(activation, out, epsilon))
            width = out
        self.head = nn.Linear(width, 1) if head else None
        self.out_dim = 1 if head else width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, in_dim) -> (R, out_dim)."""
        for linear, activation in zip(self.linears, self.activations, strict=True):
            x = activation(linear(x))
        return self.head(x) if self.head is not None else x


class TargetAttention(nn.Module):
    """The local activation unit: an MLP over [q, k, q − k, q ⊙ k] gives each behaviour's weight.

    Padding positions get weight 0 (mask), never a learned value, so trailing padding is inert.
    """

    def __init__(self, config: DINConfig) -> None:
        super().__init__()
        e = config.embedding_dim
        self.normalization = config.attention_normalization
        self.unit = MLP(
            4 * e, config.attention_units, config.attention_activation, config.dice_epsilon,
            head=True,
        )

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (B, E), keys (B, L, E), mask (B, L) bool -> interest (B, E)."""
        b, length, e = keys.shape
        q = query.unsqueeze(1).expand(b, length, e)  # (B, L, E)
        pairs = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # (B, L, 4E)
        # Run the unit on real behaviours only: Dice's batch statistics must not see padding.
        scores = keys.new_zeros(b, length)
        scores[mask] = self.unit(pairs[mask]).squeeze(-1)  # (B, L)
        weights = normalize_attention(scores, mask, self.normalization)
        return torch.einsum("bl,ble->be", weights, keys)  # (B, E)


def normalize_attention(
    scores: torch.Tensor, mask: torch.Tensor, normalization: str
) -> torch.Tensor:
    """(B, L) raw scores -> (B, L) weights, exactly 0 at padding; an all-padding row is all 0."""
    if normalization == "none":
        return scores * mask
    # Masked softmax. A finite sentinel column keeps the max defined for L = 0 and all-padding
    # rows, where the seed article's mask-then-softmax gave padding the weight exp(0).
    floor = torch.finfo(scores.dtype).min / 2
    masked = scores.masked_fill(~mask, floor)
    sentinel = masked.new_full((masked.shape[0], 1), floor)
    top = torch.cat([masked, sentinel], dim=1).amax(dim=1, keepdim=True)  # (B, 1)
    exp = torch.exp(masked - top) * mask
    return exp / exp.sum(dim=1, keepdim=True).clamp_min(1e-30)


class ItemEmbedding(nn.Module):
    """Item ‖ mean-of-categories embedding; one table pair shared by candidates and history."""

    def __init__(self, config: DINConfig) -> None:
        super().__init__()
        self.items = nn.Embedding(config.n_items, config.item_dim, padding_idx=PADDING_INDEX)
        self.categories = nn.Embedding(
            config.n_categories, config.category_dim, padding_idx=PADDING_INDEX
        )

    def forward(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """items (*S), categories (*S, C) -> (*S, E)."""
        present = (categories != PADDING_INDEX).unsqueeze(-1).to(self.categories.weight.dtype)
        summed = (self.categories(categories) * present).sum(dim=-2)  # (*S, Dc)
        mean = summed / present.sum(dim=-2).clamp_min(1.0)
        return torch.cat([self.items(items), mean], dim=-1)  # (*S, E)


class DIN(nn.Module):
    """Deep Interest Network; with use_attention=False, the paper's BaseModel (sum pooling)."""

    def __init__(self, config: DINConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = ItemEmbedding(config)
        self.attention = TargetAttention(config) if config.use_attention else None
        self.user_tables = nn.ModuleList(
            nn.Embedding(f.vocab_size, config.feature_dim, padding_idx=PADDING_INDEX)
            for f in config.user_features
        )
        self.context_tables = nn.ModuleList(
            nn.Embedding(f.vocab_size, config.feature_dim, padding_idx=PADDING_INDEX)
            for f in config.context_features
        )
        n_sparse = len(config.user_features) + len(config.context_features)
        in_dim = 2 * config.embedding_dim + n_sparse * config.feature_dim
        self.mlp = MLP(
            in_dim, config.mlp_units, config.mlp_activation, config.dice_epsilon, head=True
        )

    def forward(
        self,
        history_items: torch.Tensor,
        history_categories: torch.Tensor,
        candidate_items: torch.Tensor,
        candidate_categories: torch.Tensor,
        user_features: torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for B (history, candidate) pairs.

        history_items (B, L), history_categories (B, L, C), candidate_items (B),
        candidate_categories (B, C), user_features (B, U), context_features (B, X) -> (B,).
        """
        keys = self.embedding(history_items, history_categories)  # (B, L, E)
        query = self.embedding(candidate_items, candidate_categories)  # (B, E)
        mask = history_items != PADDING_INDEX  # (B, L)
        if self.attention is not None:
            interest = self.attention(query, keys, mask)  # (B, E)
        else:
            interest = (keys * mask.unsqueeze(-1)).sum(dim=1)  # (B, E)
        parts = [interest, query]
        parts += sparse_embeddings(self.user_tables, user_features)
        parts += sparse_embeddings(self.context_tables, context_features)
        logits: torch.Tensor = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        return logits


def sparse_embeddings(tables: nn.ModuleList, indices: torch.Tensor | None) -> list[torch.Tensor]:
    """indices (B, F), one column per table -> F tensors of (B, feature_dim)."""
    if len(tables) == 0:
        return []
    assert indices is not None and indices.shape[-1] == len(tables), "one column per feature"
    return [table(indices[..., i]) for i, table in enumerate(tables)]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DIN", "DINConfig", "Dice", "MLP", "OOV_INDEX", "PADDING_INDEX", "FIRST_TOKEN_INDEX",
    "PRESETS", "SparseFeature", "TargetAttention", "ItemEmbedding", "normalize_attention",
    "preset_config",
]
