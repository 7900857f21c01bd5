"""Serving-shaped views of a trained DIN: the graphs that export.py writes to ONNX.

ServingDIN scores one user's N candidates against one history, the shape of a ranking request
(docs/bundle.md): the history is embedded once and broadcast inside the graph, never tiled N
times. It owns no parameters of its own; everything it holds is derived from the DIN's weights:

- The first attention layer is linear in [q, k, q − k, q ⊙ k], so with W = [W1 W2 W3 W4]
  W·[q; k; q − k; q ⊙ k] + b = (W1 + W3)·q + (W2 − W3)·k + W4·(q ⊙ k) + b   (DESIGN.md).
  Everything that depends on one behaviour only is folded into a key-side operand built once per
  request, K[l, h, e] = k[l, e]·W4[h, e] + (W1 + W3)[h, e], plus a bias column (W2 − W3)·k + b,
  so the whole first layer over all N × L pairs is ONE GEMM, K (L·H, E+1) @ [q ‖ 1]ᵀ. The
  alternative, materialising q ⊙ k as (N·L, E) and multiplying by W4ᵀ ("product"), has no
  per-request operand and is the faster one for short candidate lists only (switch.py).
- Dice folds to p = σ(a·s + c) with running statistics (din.Dice.folded()), and a and c go into
  the preceding Linear (fold_linear). The pairs' element-wise passes cost as much as the GEMMs;
  the pair tensor's layout (ServingAttention's strategies) decides how fast they run.
- The first MLP layer's user/context columns are computed once per request and act as a bias.

NaiveDIN is the same weights in the shape a general-purpose server forces (history tiled per
candidate, [N, L] inputs); it reuses the DIN's own modules and differs from DIN.forward only in
running the attention unit over padded positions and masking afterwards (boolean indexing is for
Dice's training statistics and exports to NonZero/ScatterND). Both end in a sigmoid: they output
probabilities, where DIN.forward returns logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model_export.din import DIN, MLP, Dice, normalize_attention, sparse_embeddings
from service.vocab import PADDING_INDEX

# Dice's shifted form divides by 1 − α and subtracts c = −mean·a after a sum that includes c:
# beyond this |c| the cancellation would cost more float32 precision than the parity check allows.
SHIFT_LIMIT = 64.0


class FoldedActivation(nn.Module):
    """A DIN activation applied along the last dimension, Dice folded for inference.

    Dice(s) = p·s + (1 − p)·α·s = s·(α + β·σ(a·s + c)), β = 1 − α, at running statistics:
    - "dice": exactly that, six element-wise ops after the Linear;
    - "dice_shifted": the preceding Linear already outputs u = a·s + c (a and c folded into its
      weights), and this computes (u − c)·(σ(u) + α/β) = (a/β)·Dice(s): four element-wise ops, and
      the per-channel β/a is folded into the NEXT Linear's weights (fold_linear's out_scale).
    PReLU is rewritten for the last dimension (nn.PReLU broadcasts its weight along dimension 1).
    channels_first=True applies the same along axis −2 (ServingAttention's "channel" layout).
    """

    # Buffers, present according to kind.
    shift: torch.Tensor
    ratio: torch.Tensor
    scale: torch.Tensor
    alpha: torch.Tensor
    gate: torch.Tensor
    slope: torch.Tensor

    def __init__(self, kind: str, **params: torch.Tensor) -> None:
        super().__init__()
        self.kind = kind
        for name, value in params.items():
            self.register_buffer(name, value.to(torch.float32).contiguous())

    def forward(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """x (..., D) -> (..., D); channels_first: x (..., D, R), the channels on axis −2."""
        if self.kind == "identity":
            return x
        p = {name: t.unsqueeze(1) if channels_first else t
             for name, t in self.named_buffers(recurse=False)}
        if self.kind == "dice_shifted":
            return (x - p["shift"]) * (torch.sigmoid(x) + p["ratio"])
        if self.kind == "dice":
            gate = torch.sigmoid(x * p["scale"] + p["shift"])
            return x * (p["alpha"] + p["gate"] * gate)
        if self.kind == "prelu":
            return torch.clamp_min(x, 0.0) + p["slope"] * torch.clamp_max(x, 0.0)
        if self.kind == "relu":
            return torch.relu(x)
        return torch.sigmoid(x)


Folded = tuple[torch.Tensor, torch.Tensor, FoldedActivation, torch.Tensor | None]


def fold_linear(
    linear: nn.Linear, activation: nn.Module | None, in_scale: torch.Tensor | None
) -> Folded:
    """One trained Linear + activation -> (weight (out, in), bias (out,), activation, out_scale).

    in_scale is the previous layer's pending per-channel output scale (multiplied into this
    layer's input columns); out_scale is this layer's, for the next Linear, or None. Computed in
    float64, so folding adds no rounding of its own beyond the final cast to float32.
    """
    w = linear.weight.detach().double()
    b = linear.bias.detach().double()
    if in_scale is not None:
        w = w * in_scale.unsqueeze(0)
    if activation is None:
        return w, b, FoldedActivation("identity"), None
    if isinstance(activation, Dice):
        a, c = (t.detach().double() for t in activation.folded())
        alpha = activation.alpha.detach().double()
        beta = 1.0 - alpha
        if bool((beta != 0).all()) and float(c.abs().max()) <= SHIFT_LIMIT:
            w, b = a.unsqueeze(1) * w, a * b + c
            return w, b, FoldedActivation("dice_shifted", shift=c, ratio=alpha / beta), beta / a
        return w, b, FoldedActivation("dice", scale=a, shift=c, alpha=alpha, gate=beta), None
    if isinstance(activation, nn.PReLU):
        return w, b, FoldedActivation("prelu", slope=activation.weight.detach()), None
    if isinstance(activation, nn.ReLU):
        return w, b, FoldedActivation("relu"), None
    if isinstance(activation, nn.Sigmoid):
        return w, b, FoldedActivation("sigmoid"), None
    raise TypeError(f"no serving form for activation {type(activation).__name__}")


class FoldedDense(nn.Module):
    """x @ W + b and a folded activation: one Gemm plus a few element-wise ops in ONNX."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, activation: FoldedActivation
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight.t().to(torch.float32).contiguous())  # (in, out)
        self.register_buffer("bias", bias.to(torch.float32).contiguous())  # (out,)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, in) -> (R, out)."""
        out: torch.Tensor = self.activation(torch.addmm(self.bias, x, self.weight))
        return out


def mlp_layers(mlp: MLP) -> list[tuple[nn.Linear, nn.Module | None]]:
    """The MLP's (Linear, activation) pairs in order; the head, if any, last with no activation."""
    layers: list[tuple[nn.Linear, nn.Module | None]] = list(
        zip(mlp.linears, mlp.activations, strict=True)  # type: ignore[arg-type]
    )
    if mlp.head is not None:
        layers.append((mlp.head, None))
    return layers


def fold_stack(
    layers: list[tuple[nn.Linear, nn.Module | None]], in_scale: torch.Tensor | None
) -> nn.ModuleList:
    """Consecutive Linear + activation layers, each folded with its predecessor's scale."""
    stack = nn.ModuleList()
    for linear, activation in layers:
        w, b, folded, in_scale = fold_linear(linear, activation, in_scale)
        stack.append(FoldedDense(w, b, folded))
    assert in_scale is None, "the last layer of a stack has no activation to carry a scale"
    return stack


STRATEGIES = ("auto", "channel", "operand", "dual", "product")


class ServingAttention(nn.Module):
    """The local activation unit over one history and N candidates, first layer decomposed.

    strategy (all give the same scores; they differ in memory layout and traffic):
    - "channel": the pairs channel-major, (L, H, N) with the candidates innermost (ChannelPairs):
      one GEMM per behaviour, K[l] (H, E+1) @ [q ‖ 1]ᵀ, gives u for every pair; Dice's
      per-channel constants broadcast over contiguous runs of N, and each later layer is a 1x1
      convolution with its bias inside the kernel. Exported as a Scan over chunks of a few
      behaviours, K included (chunked.py), so that the pair tensors stay in cache: the fastest
      at large N with one intra-op thread. At small N its fixed costs (the Scan, K) outweigh the
      pairs, and the switched export uses "product" there (switch.py).
    - "operand": the pairs row-major, (N·L, H): one GEMM [q ‖ 1] @ K, the four-op Dice, Gemms.
    - "dual": two GEMMs over the "operand" operand, one with the sigmoid fused (onnxruntime's
      FusedGemm): p = σ(u) and d = u − c directly; Dice·(a/β) = d ⊙ p + γ ⊙ d, and the linear
      γ ⊙ d term is moved through the next layer's weights onto the operand (once per request),
      so the pairs see one Mul instead of Sigmoid, Add, Sub and Mul. Needs a shifted Dice with a
      following layer; otherwise "operand" is used.
    - "product": materialises q ⊙ k as (N·L, E) and multiplies it by W4ᵀ: no per-request
      operand, the cheapest at small N (the switched export's small branch).
    - "auto": "channel". With one intra-op thread it took 0.74 of "operand"'s time at W1 and
      0.61 of "dual"'s at W2; with 2 threads per call it lost 0-12% to them (`dinserve bench`).
    """

    query_weight: torch.Tensor
    key_weight: torch.Tensor
    pair_weight: torch.Tensor
    key_side_weight: torch.Tensor
    bias: torch.Tensor
    hoisted_weight: torch.Tensor
    first_activation: FoldedActivation
    pairs: ChannelPairs  # "channel" only

    def __init__(self, model: DIN, strategy: str = "auto", chunked: bool = True) -> None:
        super().__init__()
        assert model.attention is not None
        assert strategy in STRATEGIES, strategy
        self.normalization = model.attention.normalization
        e = model.config.embedding_dim
        (first, first_activation), *rest = mlp_layers(model.attention.unit)
        w, b, self.first_activation, scale = fold_linear(first, first_activation, None)
        w_q, w_k, w_diff, w_prod = torch.split(w, e, dim=1)  # each (H, E)
        self.hidden = w.shape[0]
        as_buffer = {
            "query_weight": (w_q + w_diff).t(),  # (E, H): once per candidate
            "key_weight": (w_k - w_diff).t(),  # (E, H): once per behaviour
            "pair_weight": w_prod.t(),  # (E, H): per pair
            "bias": b,  # (H,)
        }
        # (E, 2, H): per e, the pair weight row and the query weight row (forward's operand).
        as_buffer["key_side_weight"] = torch.stack([w_prod.t(), (w_q + w_diff).t()], dim=1)
        for name, value in as_buffer.items():
            self.register_buffer(name, value.to(torch.float32).contiguous())
        self.rest = fold_stack(rest, scale)
        dual_possible = self.first_activation.kind == "dice_shifted" and len(self.rest) > 0
        if strategy == "auto":
            strategy = "channel"
        elif strategy == "dual" and not dual_possible:
            strategy = "operand"
        self.strategy = strategy
        if strategy == "channel":
            self.pairs = ChannelPairs(self, chunked)
        if strategy == "dual":
            following = self.rest[0]
            assert isinstance(following, FoldedDense)
            # (W diag γ)ᵀ as (H, H2): the next layer's weight rows scaled by γ.
            hoisted = following.weight.double() * self.first_activation.ratio.double().unsqueeze(1)
            self.register_buffer("hoisted_weight", hoisted.to(torch.float32).contiguous())

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (N, E), keys (L, E), mask (L,) bool -> interest (N, E)."""
        n, e = query.shape
        h = self.hidden
        key_bias = torch.addmm(self.bias, keys, self.key_weight)  # (L, H)
        if self.strategy == "channel":
            return self._channel(query, keys, mask, key_bias)
        rest = list(self.rest)
        if self.strategy == "product":
            pairs = (query.unsqueeze(1) * keys.unsqueeze(0)).reshape(-1, e)  # (N·L, E)
            # -1, not L: ONNX Reshape reads a literal 0 as "copy this dimension" (L = 0).
            x = (pairs @ self.pair_weight).reshape(n, -1, h)  # (N, L, H)
            x = x + (query @ self.query_weight).unsqueeze(1) + key_bias.unsqueeze(0)
            x = self.first_activation(x.reshape(-1, h))  # (N·L, H)
        else:
            if self.strategy == "dual":
                key_bias = key_bias - self.first_activation.shift  # the bias row of d = u − c
            # Once per request: K[e, l, h] = k[l, e]·W4[h, e] + (W1 + W3)[h, e], plus the bias row,
            # as E batched GEMMs with a contraction of 2, [k[:, e] ‖ 1] (L, 2) @ [W4 ; W1 + W3]
            # (2, H): onnxruntime's broadcasting Mul and Add over (E, L, H) take ~6x as long.
            key_ones = torch.stack([keys.t(), torch.ones_like(keys.t())], dim=2)  # (E, L, 2)
            key_side = key_ones @ self.key_side_weight  # (E, L, H)
            operand = torch.cat([key_side, key_bias.unsqueeze(0)], dim=0)  # (E+1, L, H)
            operand = operand.reshape(e + 1, -1)  # (E+1, L·H)
            # Once per candidate: q with a constant 1 that picks up the bias row.
            query_ones = torch.cat([query, query.new_ones(n, 1)], dim=1)  # (N, E+1)
            if self.strategy == "dual":
                x = self._dual(query_ones, operand, keys.shape[0])  # (N·L, H2)
                rest = rest[1:]
            else:
                # Per pair: one GEMM, the first layer's pre-activation for all N × L pairs.
                x = self.first_activation((query_ones @ operand).reshape(-1, h))  # (N·L, H)
        for layer in rest:
            x = layer(x)  # (N·L, ·)
        scores = x.reshape(n, -1)  # (N, L)
        weights = normalize_attention(scores, mask.unsqueeze(0), self.normalization)  # (N, L)
        return weights @ keys  # (N, E)

    def _channel(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        """The "channel" strategy: query (N, E), keys (L, E) -> interest (N, E)."""
        n = query.shape[0]
        query_t = torch.cat([query, query.new_ones(n, 1)], dim=1).t()  # [q ‖ 1]ᵀ (E+1, N)
        inputs = (keys.unsqueeze(1), key_bias.unsqueeze(2), query_t)  # (L, 1, E), (L, H, 1)
        scores = self.pairs(*inputs)  # (L, 1, N)
        if self.pairs.chunked and torch.onnx.is_in_onnx_export():
            scores = PairScores.apply(*inputs, scores)  # one node, for chunked.py
        scores = scores.reshape(-1, n).t()  # (N, L)
        weights = normalize_attention(scores, mask.unsqueeze(0), self.normalization)  # (N, L)
        return weights @ keys  # (N, E)

    def _dual(
        self, query_ones: torch.Tensor, operand: torch.Tensor, length: int
    ) -> torch.Tensor:
        """query_ones (N, E+1), operand (E+1, L·H) of d = u − c -> the SECOND layer's output."""
        e1 = query_ones.shape[1]
        h = self.hidden
        following = self.rest[0]
        assert isinstance(following, FoldedDense)
        h2 = following.bias.shape[0]
        shift = self.first_activation.shift.expand(length, h).reshape(1, -1)  # (1, L·H)
        p = torch.sigmoid(torch.addmm(shift, query_ones, operand)).reshape(-1, h)  # σ(u) (N·L, H)
        d = (query_ones @ operand).reshape(-1, h)  # (N·L, H)
        # Next layer of d ⊙ (p + γ) = W·(d ⊙ p) + (W diag γ)·d + b, and (W diag γ)·d is linear in
        # the operand: push it through once per request, then one small GEMM per candidate.
        hoisted = (operand.reshape(-1, h) @ self.hoisted_weight).reshape(e1, -1)  # (E+1, L·H2)
        bias = following.bias.expand(length, h2).reshape(1, -1)  # (1, L·H2)
        linear = torch.addmm(bias, query_ones, hoisted).reshape(-1, h2)  # (N·L, H2)
        out: torch.Tensor = following.activation(torch.addmm(linear, d * p, following.weight))
        return out


class ChannelPairs(nn.Module):
    """The "channel" strategy's per-pair block: behaviours and candidates -> raw scores.

    Pairs are channel-major, (l, H, N) with the candidates innermost: one GEMM per behaviour,
    K[l] (H, E+1) @ [q ‖ 1]ᵀ, gives u for every pair; Dice's per-channel constants broadcast over
    contiguous runs of N; each later layer is a 1x1 convolution over (l, H, N), bias inside the
    kernel. export.py writes the block into the serving graph as an ONNX Scan over chunks of a
    few behaviours (model_export/chunked.py), so that one chunk's tensors, K included, stay in
    cache from the key-side operand to the scores; in PyTorch it runs on all behaviours at once.
    """

    pair_weight: torch.Tensor
    query_weight: torch.Tensor

    def __init__(self, attention: ServingAttention, chunked: bool = True) -> None:
        super().__init__()
        self.first_activation = attention.first_activation
        self.rest = attention.rest
        self.hidden = attention.hidden  # H, the first layer's units
        self.register_buffer("pair_weight", attention.pair_weight.t().contiguous())  # (H, E)
        self.register_buffer("query_weight", attention.query_weight.t().contiguous())  # (H, E)
        self.chunked = chunked  # exported as a Scan over history chunks (model_export/chunked.py)

    def forward(
        self, keys: torch.Tensor, key_bias: torch.Tensor, query_t: torch.Tensor
    ) -> torch.Tensor:
        """keys (l, 1, E), key bias (l, H, 1), query_t (E+1, N) = [q ‖ 1]ᵀ -> scores (l, 1, N).

        The inputs come with their broadcast axes: inside a Scan an Unsqueeze per chunk costs
        a kernel launch per chunk."""
        # K[l, h] = [k[l] ⊙ W4[h] + (W1 + W3)[h] ‖ key bias[l, h]]: (l, H, E+1).
        operand = keys * self.pair_weight + self.query_weight  # (l, H, E)
        operand = torch.cat([operand, key_bias], dim=2)
        x = self.first_activation(operand @ query_t, channels_first=True)  # (l, H, N)
        for layer in self.rest:
            assert isinstance(layer, FoldedDense)
            kernel = layer.weight.t().unsqueeze(2)  # (out, in, 1)
            # A 1x1 convolution over (l, in, N): onnxruntime adds the bias inside the kernel.
            x = layer.activation(nn.functional.conv1d(x, kernel, layer.bias), channels_first=True)
        return x  # (l, 1, N)


class PairScores(torch.autograd.Function):
    """ChannelPairs as one opaque node in a traced ONNX graph, for chunked.py to replace.

    Given the block's inputs and its already computed scores, it passes the scores through; its
    ONNX form is a single dinserve::ChannelPairScores(keys, key_bias, query_t) node, so the ops
    that computed the scores have no consumer and the exporter drops them.
    """

    DOMAIN = "dinserve"
    OP = "ChannelPairScores"

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, keys: torch.Tensor, key_bias: torch.Tensor, query_t: torch.Tensor,
        scores: torch.Tensor,
    ) -> torch.Tensor:
        return scores.clone()

    @staticmethod
    def symbolic(g: Any, keys: Any, key_bias: Any, query_t: Any, scores: Any) -> Any:
        out = g.op(f"{PairScores.DOMAIN}::{PairScores.OP}", keys, key_bias, query_t)
        out.setType(scores.type())  # (L, 1, N) float, for the exporter's shape inference
        return out


class ServingDIN(nn.Module):
    """A trained DIN (or BaseModel) in serving shape: one history, N candidates -> ctr (N,)."""

    candidate_weight: torch.Tensor
    side_weight: torch.Tensor
    mlp_bias: torch.Tensor
    first_activation: FoldedActivation

    def __init__(self, model: DIN, strategy: str = "auto", chunked: bool = True) -> None:
        super().__init__()
        config = model.config
        self.config = config
        self.embedding = model.embedding
        self.user_tables = model.user_tables
        self.context_tables = model.context_tables
        self.attention = (
            ServingAttention(model, strategy, chunked) if model.attention is not None else None
        )
        # The top MLP's first layer: [interest ‖ query] columns per candidate, the user/context
        # columns once per request (they are the same for every candidate), acting as a bias.
        (first, first_activation), *rest = mlp_layers(model.mlp)
        w, b, self.first_activation, scale = fold_linear(first, first_activation, None)
        two_e = 2 * config.embedding_dim
        as_buffer = {
            "candidate_weight": w[:, :two_e].t(),  # (2E, H1)
            "side_weight": w[:, two_e:].t(),  # (S·F, H1)
            "mlp_bias": b,  # (H1,)
        }
        for name, value in as_buffer.items():
            self.register_buffer(name, value.to(torch.float32).contiguous())
        self.mlp_rest = fold_stack(rest, scale)

    def forward(
        self,
        history_items: torch.Tensor,
        history_categories: torch.Tensor,
        candidate_items: torch.Tensor,
        candidate_categories: torch.Tensor,
        user_features: torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history_items (L), history_categories (L, C), candidate_items (N),
        candidate_categories (N, C), user_features (U), context_features (X) -> ctr (N,)."""
        keys = self.embedding(history_items, history_categories)  # (L, E)
        query = self.embedding(candidate_items, candidate_categories)  # (N, E)
        mask = history_items != PADDING_INDEX  # (L,)
        if self.attention is not None:
            interest = self.attention(query, keys, mask)  # (N, E)
        else:
            # BaseModel: sum pooling is the same for every candidate; computed once.
            pooled = (keys * mask.unsqueeze(1).to(keys.dtype)).sum(dim=0, keepdim=True)  # (1, E)
            interest = pooled.expand_as(query)  # (N, E)
        side = sparse_embeddings(self.user_tables, _row(user_features))
        side += sparse_embeddings(self.context_tables, _row(context_features))
        bias = self.mlp_bias
        if side:
            bias = torch.addmm(bias, torch.cat(side, dim=1), self.side_weight)  # (1, H1)
        x = torch.cat([interest, query], dim=1) @ self.candidate_weight + bias  # (N, H1)
        x = self.first_activation(x)
        for layer in self.mlp_rest:
            x = layer(x)  # (N, ·)
        return torch.sigmoid(x.reshape(-1))  # (N,)


def _row(features: torch.Tensor | None) -> torch.Tensor | None:
    """(F,) request-level feature indices -> (1, F), the batch-of-one the embedding tables take."""
    return None if features is None else features.unsqueeze(0)


class NaiveDIN(nn.Module):
    """The same DIN with the history tiled per candidate: what a general-purpose server runs."""

    def __init__(self, model: DIN) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        history_items: torch.Tensor,
        history_categories: torch.Tensor,
        candidate_items: torch.Tensor,
        candidate_categories: torch.Tensor,
        user_features: torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """history_items (N, L), history_categories (N, L, C), candidate_items (N),
        candidate_categories (N, C), user_features (N, U), context_features (N, X) -> ctr (N,)."""
        model = self.model
        keys = model.embedding(history_items, history_categories)  # (N, L, E)
        query = model.embedding(candidate_items, candidate_categories)  # (N, E)
        mask = history_items != PADDING_INDEX  # (N, L)
        if model.attention is not None:
            n, length, e = keys.shape
            q = query.unsqueeze(1).expand(n, length, e)  # (N, L, E)
            pairs = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # (N, L, 4E)
            # -1, not N·L or L: ONNX Reshape reads a literal 0 as "copy this dimension" (L = 0).
            scores = model.attention.unit(pairs.reshape(-1, 4 * e))  # (N·L, 1)
            weights = normalize_attention(
                scores.reshape(n, -1), mask, model.attention.normalization
            )  # (N, L)
            interest = torch.einsum("nl,nle->ne", weights, keys)  # (N, E)
        else:
            interest = (keys * mask.unsqueeze(-1)).sum(dim=1)  # (N, E)
        parts = [interest, query]
        parts += sparse_embeddings(model.user_tables, user_features)
        parts += sparse_embeddings(model.context_tables, context_features)
        return torch.sigmoid(model.mlp(torch.cat(parts, dim=-1)).squeeze(-1))  # (N,)
