"""fp16 graph variants for GPUs: half-precision weights and activations behind a float32 interface.

The converter is ONNX Runtime's own (``onnxruntime.transformers.float16``, shipped with onnxruntime, so no new
dependency): onnxconverter-common 1.16's converter, which it forked from, writes graphs that ONNX Runtime refuses on
these models (a ``Cast`` whose declared output type it does not update, a ``MatMul`` fed float and float16).

* ``keep_io_types``: inputs and outputs stay float32 (casts inside the graph), so the manifest's tensor specs, the
  server and its clients are the same for every variant; ``ATTN_VARIANT=fp16`` is all it takes to serve it.
* ``op_block_list``: the converter's defaults (ops with no float16 type constraint, such as ``TopK`` and ``Range``)
  plus the two softmaxes, which stay float32 for accuracy, not for lack of kernels: the attention rows are part of
  the response (each a distribution that sums to 1) and the log-probabilities add up over a whole hypothesis in
  beam search. Their inputs are rounded to fp16 by the node before them; only the exponentials and sums are float32.
* The CPU provider has float16 kernels for few ops; for the others ONNX Runtime inserts casts at load time and runs
  them in float32, so the variant loads and runs on the CPU as well (slower than fp32 there: it is for GPUs). The
  parity check (:mod:`exporter.parity`) runs it on the CPU provider, which proves that on every export.
"""

from __future__ import annotations

from pathlib import Path

import onnx

KEPT_FP32 = ["Softmax", "LogSoftmax"]


def to_fp16(source: Path, target: Path) -> None:
    """Write ``target``: ``source`` with float16 weights and activations, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(source))
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEPT_FP32],
    )
    OnnxModel(converted).topological_sort()  # the converter appends the casts of the inputs after their users
    onnx.save(converted, str(target))
