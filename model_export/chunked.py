"""The "channel" strategy's per-pair block as an ONNX Scan over chunks of the history.

onnxruntime runs a graph one operator at a time over whole tensors. At W1 the pair tensors of
the attention unit are L × H × N = 100 × 80 × 200 floats (6.4 MB): the GEMM writes them to
memory and every element-wise pass of Dice and every 1x1 convolution reads them back from there.
Scanning over a few behaviours at a time keeps one chunk's tensors (at most CHUNK_FLOATS floats,
256 KB) in the core's cache from the key-side operand to the scores: whole serving graphs took
0.65 of the unchunked channel graph's time at W1 and 0.57 at W2 (one thread, interleaved, as
`dinserve bench` times them); docs/performance.md has the chunk-size sweep.

serving.ServingAttention marks the block in the traced graph with one
dinserve::ChannelPairScores(keys, key_bias, query_t) node (serving.PairScores). chunk_pair_scores
replaces it with: keys (L, 1, E) and key bias (L, H, 1) padded with zero rows to whole chunks and
reshaped to (chunks, chunk, ...), a Scan whose body is the block itself traced on its own
(serving.ChannelPairs: one chunk per iteration, query_t read from the outer scope), and the
padding's rows cut off the stacked scores. The chunk length in behaviours is computed in the
graph from N, so one graph suits every candidate count.

The chunk size is the graph input CHUNK_INPUT with CHUNK_FLOATS as its default (an overridable
initializer: onnxruntime lists it apart from the required inputs and uses the default unless the
caller feeds it). Chunks in L2 are what one thread wants; with two intra-op threads one chunk of
the whole history is faster (its operators are large enough to split): the service feeds that
when it runs more than one (service/model.py, docs/performance.md).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from model_export.serving import ChannelPairs, PairScores
from model_export.switch import renamed, renamed_node
from service.bundle import CHUNK_INPUT

# Floats in one chunk's largest pair tensor (l × H × N); the chunk length l follows from it.
CHUNK_FLOATS = 65536  # the default of the optional graph input CHUNK_INPUT
_PREFIX = "pairs"


def chunk_pair_scores(model: onnx.ModelProto, pairs: ChannelPairs, opset: int) -> onnx.ModelProto:
    """model with its one ChannelPairScores node replaced by the chunked Scan; checked."""
    graph = model.graph
    markers = [n for n in graph.node if n.domain == PairScores.DOMAIN]
    if len(markers) != 1 or markers[0].op_type != PairScores.OP:
        raise ValueError(f"expected one {PairScores.DOMAIN}::{PairScores.OP} node, got "
                         f"{[(n.domain, n.op_type) for n in markers]}")
    marker = markers[0]
    keys, key_bias, query_t = marker.input
    body = _body(pairs, query_t, opset)

    def name(s: str) -> str:
        return f"{_PREFIX}/{s}"

    constants = {"hidden": pairs.hidden, "zero": 0, "one": 1, "minus_one": -1}
    nodes = [
        helper.make_node("Shape", [keys], [name("length")], start=0, end=1),
        helper.make_node("Shape", [query_t], [name("n")], start=1, end=2),
        # Behaviours per chunk: as many as fit CHUNK_FLOATS at this N, at least 1, at most L.
        helper.make_node("Mul", [name("hidden"), name("n")], [name("per_behaviour")]),
        helper.make_node("Div", [CHUNK_INPUT, name("per_behaviour")], [name("fit")]),
        helper.make_node("Max", [name("length"), name("one")], [name("length_or_one")]),
        helper.make_node("Min", [name("fit"), name("length_or_one")], [name("fit_capped")]),
        helper.make_node("Max", [name("fit_capped"), name("one")], [name("chunk")]),
        # ceil(L / chunk) chunks, at least one (L = 0: one chunk of padding, all of it cut off).
        helper.make_node("Sub", [name("chunk"), name("one")], [name("chunk_less_one")]),
        helper.make_node("Add", [name("length"), name("chunk_less_one")], [name("rounded_up")]),
        helper.make_node("Div", [name("rounded_up"), name("chunk")], [name("chunks_raw")]),
        helper.make_node("Max", [name("chunks_raw"), name("one")], [name("chunks")]),
        helper.make_node("Mul", [name("chunks"), name("chunk")], [name("padded_length")]),
        helper.make_node("Sub", [name("padded_length"), name("length")], [name("padding")]),
        # Pads for the rank-3 inputs (L, 1, E) and (L, H, 1): zero rows after the last one.
        helper.make_node("Concat", [name("zero"), name("zero"), name("zero"), name("padding"),
                                    name("zero"), name("zero")], [name("pads")], axis=0),
    ]
    scan_inputs = []
    for base, value in (("keys", keys), ("key_bias", key_bias)):
        # (L, a, b) -> zero rows up to whole chunks -> (chunks, chunk, a, b)
        nodes += [
            helper.make_node("Pad", [value, name("pads")], [name(f"{base}_padded")]),
            helper.make_node("Shape", [value], [name(f"{base}_tail")], start=1),
            helper.make_node("Concat", [name("chunks"), name("chunk"), name(f"{base}_tail")],
                             [name(f"{base}_shape")], axis=0),
            helper.make_node("Reshape", [name(f"{base}_padded"), name(f"{base}_shape")],
                             [name(f"{base}_chunked")]),
        ]
        scan_inputs.append(name(f"{base}_chunked"))
    nodes += [
        helper.make_node("Scan", scan_inputs, [name("stacked")], name=name("scan"), body=body,
                         num_scan_inputs=2),  # (chunks, chunk, 1, N)
        helper.make_node("Concat", [name("minus_one"), name("one"), name("n")],
                         [name("flat_shape")], axis=0),
        helper.make_node("Reshape", [name("stacked"), name("flat_shape")], [name("flat")]),
        helper.make_node("Slice", [name("flat"), name("zero"), name("length")], marker.output),
    ]
    for node in nodes:
        node.name = node.name or node.output[0]
    initializers = [numpy_helper.from_array(np.array([v], dtype=np.int64), name(k))
                    for k, v in constants.items()]

    at = list(graph.node).index(marker)
    kept = [n for n in graph.node if n is not marker]
    graph.ClearField("node")
    graph.node.extend(kept[:at] + nodes + kept[at:])
    graph.initializer.extend(initializers)
    graph.input.append(helper.make_tensor_value_info(CHUNK_INPUT, onnx.TensorProto.INT64, [1]))
    graph.initializer.append(
        numpy_helper.from_array(np.array([CHUNK_FLOATS], dtype=np.int64), CHUNK_INPUT)
    )
    imports = [o for o in model.opset_import if o.domain != PairScores.DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(imports)
    onnx.checker.check_model(model, full_check=True)
    return model


def _body(pairs: ChannelPairs, query_t: str, opset: int) -> onnx.GraphProto:
    """ChannelPairs traced on its own as a Scan body: one chunk in, query_t from outside."""
    e = pairs.pair_weight.shape[1]
    sample = (torch.zeros(2, 1, e), torch.zeros(2, pairs.hidden, 1), torch.zeros(e + 1, 3))
    with tempfile.TemporaryDirectory(prefix="dinserve-chunk-") as tmp:
        path = Path(tmp, "pairs.onnx")
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # as in export._trace
            torch.onnx.export(
                pairs.eval(), sample, str(path),
                input_names=["keys", "key_bias", "query_t"], output_names=["scores"],
                dynamic_axes={"keys": {0: "chunk"}, "key_bias": {0: "chunk"},
                              "query_t": {1: "N"}, "scores": {0: "chunk", 2: "N"}},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        traced = onnx.load(str(path)).graph

    def rename(s: str) -> str:
        if s == "query_t":
            return query_t  # the outer graph's value: a scan-invariant input
        return f"{_PREFIX}/body/{s}" if s else s

    nodes = [renamed_node(node, f"{_PREFIX}/body", rename, rename) for node in traced.node]
    initializers = [renamed(init, rename) for init in traced.initializer]
    inputs = [helper.make_tensor_value_info(rename("keys"), onnx.TensorProto.FLOAT, [None, 1, e]),
              helper.make_tensor_value_info(rename("key_bias"), onnx.TensorProto.FLOAT,
                                            [None, pairs.hidden, 1])]
    (out,) = traced.output
    outputs = [helper.make_tensor_value_info(rename(out.name), onnx.TensorProto.FLOAT,
                                             [None, 1, None])]
    return helper.make_graph(nodes, f"{_PREFIX}/body", inputs, outputs, initializer=initializers)
