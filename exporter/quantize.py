"""Dynamic int8 quantisation of exported graphs.

ONNX Runtime's dynamic quantiser turns a ``Gemm`` with ``transB=1`` into a ``MatMulInteger`` with the weight left
untransposed, which fails shape inference as soon as a layer is not square (GRU cells, the tied output layer). So
every ``Gemm`` whose weight is an initializer is first rewritten as ``MatMul`` (with the weight transposed ahead of
time) plus ``Add``; those the quantiser handles correctly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Y = A·B' + C`` Gemm nodes with constant B as MatMul + Add, in place; returns how many."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    rewritten = 0
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        weight_name = f"{node.name or node.output[0]}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewritten


def quantize(source: Path, target: Path) -> None:
    """Write ``target``: ``source`` with int8 weights for its matrix products and embedding lookups."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    gemm_to_matmul(model)
    prepared = target.with_suffix(".prepared.onnx")
    onnx.save(model, str(prepared))
    try:
        quantize_dynamic(
            str(prepared), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"]
        )
    finally:
        prepared.unlink(missing_ok=True)
