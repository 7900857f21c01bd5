"""The reference DIN block by block: shapes, padding invariance, empty histories, Dice folding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_export.din import (
    DIN,
    MLP,
    Dice,
    DINConfig,
    ItemEmbedding,
    SparseFeature,
    TargetAttention,
    normalize_attention,
    parameter_count,
    preset_config,
)

B, L, C = 6, 9, 3
N_ITEMS, N_CATEGORIES = 40, 7


def small_config(features: bool = False, **overrides: Any) -> DINConfig:
    extra: dict[str, Any] = dict(
        n_items=N_ITEMS, n_categories=N_CATEGORIES, max_categories=C, max_history_length=L,
        item_dim=8, category_dim=4, attention_units=(16, 8), mlp_units=(20, 10),
    )
    if features:
        extra["user_features"] = (SparseFeature("age", 5), SparseFeature("gender", 4))
        extra["context_features"] = (SparseFeature("device", 3),)
    return preset_config(overrides.pop("preset", "paper"), **{**extra, **overrides})


def random_inputs(
    config: DINConfig, lengths: list[int], length: int = L, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch whose i-th history holds lengths[i] real behaviours, 0-padded to `length`."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    items = torch.randint(2, config.n_items, (b, length), generator=g)
    categories = torch.randint(1, config.n_categories, (b, length, C), generator=g)
    categories[..., -1] = 0  # items with fewer than C categories
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    items = items * real
    categories = categories * real[..., None]
    inputs = {
        "history_items": items,
        "history_categories": categories,
        "candidate_items": torch.randint(2, config.n_items, (b,), generator=g),
        "candidate_categories": torch.randint(0, config.n_categories, (b, C), generator=g),
    }
    if config.user_features:
        inputs["user_features"] = torch.stack(
            [torch.randint(0, f.vocab_size, (b,), generator=g) for f in config.user_features], 1
        )
    if config.context_features:
        inputs["context_features"] = torch.stack(
            [torch.randint(0, f.vocab_size, (b,), generator=g) for f in config.context_features],
            1,
        )
    return inputs


def pad(inputs: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The same batch with `extra` more trailing padding positions."""
    out = dict(inputs)
    out["history_items"] = torch.nn.functional.pad(inputs["history_items"], (0, extra))
    out["history_categories"] = torch.nn.functional.pad(
        inputs["history_categories"], (0, 0, 0, extra)
    )
    return out


def randomize_dice(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics and α, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Dice):
            dim = module.alpha.shape[0]
            module.norm.running_mean.copy_(torch.randn(dim, generator=g))  # type: ignore[union-attr]
            module.norm.running_var.copy_(torch.rand(dim, generator=g) + 0.5)  # type: ignore[union-attr]
            module.alpha.data.copy_(torch.rand(dim, generator=g))


# -- blocks -----------------------------------------------------------------------------------


def test_dice_shape_and_folded_form_equals_eval_mode() -> None:
    torch.manual_seed(0)
    dice = Dice(5)
    randomize_dice(dice)
    dice.eval()
    x = torch.randn(11, 5)
    a, c = dice.folded()
    p = torch.sigmoid(a * x + c)
    folded = p * x + (1 - p) * dice.alpha * x
    out = dice(x)
    assert out.shape == (11, 5)
    torch.testing.assert_close(out, folded, rtol=0, atol=1e-6)


def test_dice_in_training_uses_batch_statistics_and_survives_one_row() -> None:
    dice = Dice(3).train()
    x = torch.randn(64, 3) * 4 + 10
    dice(x)
    assert dice.norm.running_mean is not None and dice.norm.running_mean.abs().sum() > 0
    before = dice.norm.running_mean.clone()
    out = dice(torch.randn(1, 3))  # one row: no batch statistics, running ones are used
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(dice.norm.running_mean, before)


@pytest.mark.parametrize("activation", ["dice", "relu", "prelu", "sigmoid"])
def test_mlp_shapes(activation: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 12)
    with_head = MLP(12, (16, 8), activation, 1e-8, head=True)  # type: ignore[arg-type]
    without = MLP(12, (16, 8), activation, 1e-8, head=False)  # type: ignore[arg-type]
    assert with_head(x).shape == (7, 1) and with_head.out_dim == 1
    assert without(x).shape == (7, 8) and without.out_dim == 8
    assert MLP(12, (), activation, 1e-8, head=True)(x).shape == (7, 1)  # type: ignore[arg-type]


def test_item_embedding_shapes_and_padding_is_zero() -> None:
    torch.manual_seed(0)
    config = small_config()
    embedding = ItemEmbedding(config)
    inputs = random_inputs(config, [L, 3, 0, 1, 5, 2])
    keys = embedding(inputs["history_items"], inputs["history_categories"])
    query = embedding(inputs["candidate_items"], inputs["candidate_categories"])
    assert keys.shape == (B, L, config.embedding_dim) == (B, L, 12)
    assert query.shape == (B, 12)
    assert (keys[2] == 0).all()  # an all-padding history embeds to zeros
    # categories are averaged over the present ones only
    cats = torch.tensor([[3, 0, 0], [3, 3, 0]])
    mean = embedding(torch.tensor([2, 2]), cats)[:, 8:]
    torch.testing.assert_close(mean[0], mean[1])


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_target_attention_shape(normalization: str) -> None:
    torch.manual_seed(0)
    config = small_config(attention_normalization=normalization)
    attention = TargetAttention(config)
    e = config.embedding_dim
    mask = torch.arange(L)[None, :] < torch.tensor([L, 3, 0, 1, 5, 2])[:, None]
    out = attention(torch.randn(B, e), torch.randn(B, L, e) * mask[..., None], mask)
    assert out.shape == (B, e)
    assert (out[2] == 0).all()  # empty history: zero interest


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("use_attention", [True, False])
def test_din_and_base_model_shapes(features: bool, use_attention: bool) -> None:
    torch.manual_seed(0)
    config = small_config(features=features, use_attention=use_attention)
    model = DIN(config)
    assert (model.attention is not None) == use_attention
    inputs = random_inputs(config, [L, 3, 0, 1, 5, 2])
    logits = model(**inputs)
    assert logits.shape == (B,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.sum().backward()  # trains: gradients reach the embeddings
    assert model.embedding.items.weight.grad is not None
    if features:
        assert len(model.user_tables) == 2 and len(model.context_tables) == 1
        plain = DIN(small_config(use_attention=use_attention))
        assert parameter_count(model) > parameter_count(plain)


def test_features_change_the_score() -> None:
    torch.manual_seed(0)
    config = small_config(features=True)
    model = DIN(config).eval()
    inputs = random_inputs(config, [4] * B)
    other = dict(inputs, user_features=(inputs["user_features"] + 1) % 4)
    assert not torch.allclose(model(**inputs), model(**other))


# -- padding and empty histories --------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("use_attention", [True, False])
def test_trailing_padding_does_not_change_logits(normalization: str, use_attention: bool) -> None:
    torch.manual_seed(0)
    config = small_config(attention_normalization=normalization, use_attention=use_attention)
    model = DIN(config)
    randomize_dice(model)
    inputs = random_inputs(config, [L, 3, 0, 1, 5, 2])
    model.eval()
    torch.testing.assert_close(model(**inputs), model(**pad(inputs, 13)), rtol=0, atol=1e-6)
    # In training mode too: Dice's batch statistics never see padded positions.
    model.train()
    torch.testing.assert_close(model(**inputs), model(**pad(inputs, 13)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_empty_history_gives_finite_scores(normalization: str) -> None:
    torch.manual_seed(0)
    config = small_config(attention_normalization=normalization)
    model = DIN(config).eval()
    inputs = random_inputs(config, [0] * B)
    empty = model(**inputs)
    assert torch.isfinite(empty).all()
    # L = 0 (no history positions at all) scores exactly like an all-padding history
    zero_length = dict(
        inputs,
        history_items=inputs["history_items"][:, :0],
        history_categories=inputs["history_categories"][:, :0],
    )
    torch.testing.assert_close(model(**zero_length), empty, rtol=0, atol=1e-6)


def test_softmax_weights_sum_to_one_on_real_behaviours_and_zero_on_empty_rows() -> None:
    scores = torch.randn(4, 6) * 50
    mask = torch.tensor([
        [True] * 6, [True, True, False, False, False, False], [False] * 6, [True] + [False] * 5,
    ])
    weights = normalize_attention(scores, mask, "softmax")
    assert not torch.isnan(weights).any()
    torch.testing.assert_close(weights.sum(dim=1), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert (weights[~mask] == 0).all()
    # Unnormalised (paper section 4.3): the raw scores, zero at padding.
    raw = normalize_attention(scores, mask, "none")
    torch.testing.assert_close(raw, scores * mask)
    assert normalize_attention(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool),
                               "softmax").shape == (3, 0)


def test_fixed_seed_gives_identical_models() -> None:
    config = small_config(features=True)
    torch.manual_seed(42)
    first = DIN(config)
    torch.manual_seed(42)
    second = DIN(config)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    inputs = random_inputs(config, [L, 3, 0, 1, 5, 2])
    assert torch.equal(first.eval()(**inputs), second.eval()(**inputs))


def test_config_round_trips_through_a_dict() -> None:
    config = small_config(features=True, preset="deepctr")
    assert DINConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("nope")
