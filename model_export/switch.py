"""One ONNX graph from two equivalent ones: the first for small candidate lists, the other else.

The serving graph's first attention layer has strategies with different cost shapes
(serving.ServingAttention). "channel" (and "operand", "dual") build a key-side operand once per
request, L × H × (E + 1) floats, then do every pair in one GEMM: the best at large N, but at
small N the operand costs more than the pairs themselves. "product" has no per-request operand
and costs per pair a little more. Measured on 2026-11-28 (random models as bench/graph.py builds
them, 1 thread, L = max, the variants interleaved call by call; the 2-core Intel Xeon of
docs/performance.md), product vs channel, ms:

    W1 (E = 128, L = 100)  N = 16: 1.48 vs 3.38; N = 64: 4.18 vs 5.02; N = 100: 6.79 vs 7.34;
                           N = 150: 14.8 vs 14.1; N = 200: 13.4 vs 12.3
    W2 (E = 16, L = 50)    N = 32: 0.46 vs 0.49; N = 64: 0.91 vs 0.77; N = 128: 1.94 vs 1.49

and on the trained MovieLens model (E = 64, L = 100): N = 64: 3.35 vs 3.32; N = 100: 5.70 vs
5.75; N = 150: 8.12 vs 7.77; N = 200: 11.1 vs 9.6. The crossover grows with E (the operand's
cost does), so an exported serving graph holds both, behind an ONNX If on N at
small_candidates(E) = max(32, E). Both branches read the graph inputs from the outer scope and
end in the same output; the parity check and the manifest's golden cases run candidate lists on
both sides of the threshold. The If itself costs nothing measurable (an onnxruntime profile at
200 x 100: 22.42 ms per run with it, 22.43 without; 10 x 50: 0.309 against 0.302 ms).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

_Named = TypeVar("_Named", onnx.TensorProto, onnx.ValueInfoProto)

# Fewest candidates the large-N branch is ever chosen above (module docstring: W2's crossover).
MIN_SMALL_CANDIDATES = 32


def small_candidates(embedding_dim: int) -> int:
    """The If takes the "product" branch when N <= this (module docstring: the crossovers)."""
    return max(MIN_SMALL_CANDIDATES, embedding_dim)

_N = "switch/candidates"
_LIMIT = "switch/small_limit"
_IS_SMALL = "switch/is_small"


def _branch(model: onnx.ModelProto, prefix: str, outer: set[str]) -> onnx.GraphProto:
    """model's graph as an If branch: every internal name prefixed, graph inputs read from outer."""
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise ValueError(f"{prefix}: node {node.name} has a subgraph; cannot nest it")
    internal = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    internal.discard("")

    def rename(name: str) -> str:
        if name in internal:
            return f"{prefix}/{name}"
        if name and name not in outer:
            raise ValueError(f"{prefix}: {name!r} is neither an input nor produced in the graph")
        return name

    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name}"
        copy.ClearField("input")
        copy.ClearField("output")
        copy.input.extend(rename(i) for i in node.input)
        copy.output.extend(rename(o) for o in node.output)
        nodes.append(copy)

    def renamed(proto: _Named) -> _Named:
        copy = type(proto)()
        copy.CopyFrom(proto)
        copy.name = rename(proto.name)
        return copy

    initializers = [renamed(init) for init in graph.initializer]
    outputs = [renamed(out) for out in graph.output]
    return helper.make_graph(nodes, prefix, inputs=[], outputs=outputs, initializer=initializers)


def switch_on_candidates(
    small: onnx.ModelProto, large: onnx.ModelProto, small_max: int,
    candidates_input: str = "candidate_items",
) -> onnx.ModelProto:
    """A model that runs `small` when N (the length of candidates_input) <= small_max, else `large`.

    Both must have the same inputs and outputs (names, types, shapes) and the same opsets.
    """
    def signature(values: object) -> list[str]:
        return [v.SerializeToString().hex() for v in values]  # type: ignore[attr-defined]

    if signature(small.graph.input) != signature(large.graph.input):
        raise ValueError("the two graphs have different inputs")
    if signature(small.graph.output) != signature(large.graph.output):
        raise ValueError("the two graphs have different outputs")
    if signature(small.opset_import) != signature(large.opset_import):
        raise ValueError("the two graphs import different opsets")
    inputs = {i.name for i in small.graph.input}
    if candidates_input not in inputs:
        raise ValueError(f"no input named {candidates_input!r}")

    then_branch = _branch(small, "small", inputs)
    else_branch = _branch(large, "large", inputs)
    outputs = [o.name for o in small.graph.output]
    nodes = [
        helper.make_node("Shape", [candidates_input], [_N], name="switch/shape", start=0, end=1),
        helper.make_node("LessOrEqual", [_N, _LIMIT], [_IS_SMALL], name="switch/compare"),
        helper.make_node("If", [_IS_SMALL], outputs, name="switch/if",
                         then_branch=then_branch, else_branch=else_branch),
    ]
    limit = numpy_helper.from_array(np.array([small_max], dtype=np.int64), name=_LIMIT)
    graph = helper.make_graph(
        nodes, "serving_switch", inputs=list(small.graph.input),
        outputs=list(small.graph.output), initializer=[limit],
    )
    model = helper.make_model(graph, opset_imports=list(small.opset_import),
                              producer_name=small.producer_name,
                              producer_version=small.producer_version)
    model.ir_version = small.ir_version
    helper.set_model_props(model, {"switch_small_candidates": str(small_max)})
    onnx.checker.check_model(model, full_check=True)
    return model


def taken_branch(model: onnx.ModelProto, n: int) -> onnx.GraphProto | None:
    """The branch a switched model runs for n candidates; None when model is not switched."""
    ifs = [node for node in model.graph.node if node.name == "switch/if"]
    limits = [t for t in model.graph.initializer if t.name == _LIMIT]
    if not ifs or not limits:
        return None
    small_max = int(numpy_helper.to_array(limits[0]).reshape(-1)[0])
    wanted = "then_branch" if n <= small_max else "else_branch"
    return next(a.g for a in ifs[0].attribute if a.name == wanted)
