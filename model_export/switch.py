"""One ONNX graph from two equivalent ones: the first for small candidate lists, the other else.

The serving graph's first attention layer has strategies with different cost shapes
(serving.ServingAttention). "channel" scans the history in chunks, building each chunk's part of
a key-side operand and doing its pairs in one GEMM (chunked.py): the best at large N, but at
small N its fixed costs (the Scan, the operand) outweigh the pairs. "product" has no per-request
operand and costs per pair a little more. Timed interleaved, one thread: "product" took 0.44 of
"channel"'s time at 16 candidates and "channel" 0.90 of "product"'s at 100 (W1); the crossovers
fall at 48-64 candidates for W1, a little lower on the trained MovieLens model, a little higher
for W2. So an exported serving graph holds both, behind an ONNX If on N at SMALL_CANDIDATES.
Both branches read the graph inputs from the outer scope and end in the same output; the parity
check and the manifest's golden cases run candidate lists on both sides of the threshold. The If
itself costs under 1 % of a W1 call; `dinserve bench` reports it (serving_channel / serving).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.bundle import CANDIDATE_ITEMS

_Named = TypeVar("_Named", onnx.TensorProto, onnx.ValueInfoProto)

# The If takes the "product" branch when N <= this (module docstring: the crossovers).
SMALL_CANDIDATES = 48

_N = "switch/candidates"
_LIMIT = "switch/small_limit"
_IS_SMALL = "switch/is_small"


def _branch(model: onnx.ModelProto, prefix: str, outer: set[str]) -> onnx.GraphProto:
    """model's graph as an If branch: every internal name prefixed, graph inputs read from outer.

    Subgraphs (a Scan's body, chunked.py) are copied with the same renaming: their own names get
    the prefix too, and their references to the branch's values follow those values' new names.
    An initializer named like an outer input is that input's default (optional_inputs): the
    outer graph holds it, so the branch reads the input from there.
    """
    graph = model.graph
    internal = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    internal -= outer | {""}

    def rename(name: str) -> str:
        if name in internal:
            return f"{prefix}/{name}"
        if name and name not in outer:
            raise ValueError(f"{prefix}: {name!r} is neither an input nor produced in the graph")
        return name

    def rename_nested(name: str) -> str:
        return name if not name or name in outer else f"{prefix}/{name}"

    nodes = [renamed_node(node, prefix, rename, rename_nested) for node in graph.node]
    initializers = [renamed(i, rename) for i in graph.initializer if i.name not in outer]
    outputs = [renamed(out, rename) for out in graph.output]
    return helper.make_graph(nodes, prefix, inputs=[], outputs=outputs, initializer=initializers)


def optional_inputs(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Graph inputs that have an initializer of the same name (a default), by name."""
    defaults = {i.name: i for i in model.graph.initializer}
    return {i.name: defaults[i.name] for i in model.graph.input if i.name in defaults}


def renamed(proto: _Named, rename: Callable[[str], str]) -> _Named:
    """A copy of an initializer or value info under rename(its name)."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    copy.name = rename(proto.name)
    return copy


def renamed_node(
    node: onnx.NodeProto, prefix: str, rename: Callable[[str], str],
    rename_nested: Callable[[str], str],
) -> onnx.NodeProto:
    """A copy of node named prefix/its name, inputs and outputs through rename, and the names
    inside its subgraphs (If branches, Scan bodies) through rename_nested."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{prefix}/{node.name or node.output[0]}"
    copy.ClearField("input")
    copy.ClearField("output")
    copy.input.extend(rename(i) for i in node.input)
    copy.output.extend(rename(o) for o in node.output)
    for attribute in copy.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            attribute.g.CopyFrom(_renamed_graph(attribute.g, prefix, rename_nested))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs = [_renamed_graph(g, prefix, rename_nested) for g in attribute.graphs]
            attribute.ClearField("graphs")
            attribute.graphs.extend(graphs)
    return copy


def _renamed_graph(
    graph: onnx.GraphProto, prefix: str, rename: Callable[[str], str]
) -> onnx.GraphProto:
    """A subgraph with every name but the model's inputs prefixed (rename)."""
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)
    copy.name = f"{prefix}/{graph.name}"
    for field in ("input", "output", "value_info", "initializer"):
        values = [renamed(v, rename) for v in getattr(graph, field)]
        copy.ClearField(field)  # type: ignore[arg-type]
        getattr(copy, field).extend(values)
    nodes = [renamed_node(node, prefix, rename, rename) for node in graph.node]
    copy.ClearField("node")
    copy.node.extend(nodes)
    return copy


def switch_on_candidates(
    small: onnx.ModelProto, large: onnx.ModelProto, small_max: int,
    candidates_input: str = CANDIDATE_ITEMS,
) -> onnx.ModelProto:
    """A model that runs `small` when N (the length of candidates_input) <= small_max, else `large`.

    Both must have the same required inputs and outputs (names, types, shapes) and the same
    opsets. Inputs with a default (optional_inputs: bundle_format.CHUNK_INPUT) may be in either; the
    switched graph keeps them as inputs with their defaults, which must agree where both have one.
    """
    def signature(values: object) -> list[str]:
        return [v.SerializeToString().hex() for v in values]  # type: ignore[attr-defined]

    small_optional, large_optional = optional_inputs(small), optional_inputs(large)
    optional = {**small_optional, **large_optional}
    for name in small_optional.keys() & large_optional.keys():
        if signature([small_optional[name]]) != signature([large_optional[name]]):
            raise ValueError(f"the two graphs give the input {name!r} different defaults")

    def required(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        return [i for i in model.graph.input if i.name not in optional]

    if signature(required(small)) != signature(required(large)):
        raise ValueError("the two graphs have different inputs")
    if signature(small.graph.output) != signature(large.graph.output):
        raise ValueError("the two graphs have different outputs")
    if signature(small.opset_import) != signature(large.opset_import):
        raise ValueError("the two graphs import different opsets")
    declared = {i.name: i for model in (large, small) for i in model.graph.input}
    inputs = required(small) + [declared[name] for name in sorted(optional)]
    names = {i.name for i in inputs}
    if candidates_input not in names:
        raise ValueError(f"no input named {candidates_input!r}")

    then_branch = _branch(small, "small", names)
    else_branch = _branch(large, "large", names)
    outputs = [o.name for o in small.graph.output]
    nodes = [
        helper.make_node("Shape", [candidates_input], [_N], name="switch/shape", start=0, end=1),
        helper.make_node("LessOrEqual", [_N, _LIMIT], [_IS_SMALL], name="switch/compare"),
        helper.make_node("If", [_IS_SMALL], outputs, name="switch/if",
                         then_branch=then_branch, else_branch=else_branch),
    ]
    limit = numpy_helper.from_array(np.array([small_max], dtype=np.int64), name=_LIMIT)
    graph = helper.make_graph(
        nodes, "serving_switch", inputs=inputs, outputs=list(small.graph.output),
        initializer=[limit, *(optional[name] for name in sorted(optional))],
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
