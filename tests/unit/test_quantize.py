from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize import gemm_to_matmul, quantize


def _gemm_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """Y = X · Wᵀ + b with a non-square W (out 5, in 3): the case the stock quantiser gets wrong."""
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gemm_rewrite_keeps_the_function_and_quantises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    model = _gemm_model(weight, bias)
    expected = _run(model, x)
    rewritten = _gemm_model(weight, bias)
    assert gemm_to_matmul(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(_run(rewritten, x), expected, rtol=1e-6, atol=1e-6)

    source, target = tmp_path / "fc.onnx", tmp_path / "fc.int8.onnx"
    onnx.save(model, str(source))
    quantize(source, target)
    ops = {n.op_type for n in onnx.load(str(target)).graph.node}
    assert "MatMulInteger" in ops
    np.testing.assert_allclose(_run(target, x), expected, atol=0.1)  # int8 weights: close, not equal
    assert not list(tmp_path.glob("*.prepared.onnx"))
