"""Tensors of the V2 (Triton / KServe) protocol: the specs of a model's inputs and outputs, BYTES packing, and
reading a ``ModelInferRequest``'s inputs, outputs and parameters. No server here (:mod:`server.triton` serves them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from attention_pb.v1 import attention_pb2 as pb
from kserve_v2_pb import grpc_service_pb2 as v2
from server.captioning import CaptionModel
from server.errors import InvalidInput, cut, echo
from server.registry import Runtime

INT_OPTIONS = ("beam_size", "max_output_tokens", "attention_layer", "attention_head")
# Triton's sequence of requests to one stateful model: it ignores them for a model without sequence batching, as every
# model here is (each request stands alone), once it has checked their types.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
# priority: accepted, nothing to order; content_type: MLServer's, see UTF8_TENSORS
PARAMETERS = (*INT_OPTIONS, "length_penalty", "timeout", "priority", *SEQUENCE_PARAMETERS, "content_type")
# MLServer's content types (its codecs' names), which clients built on its codecs put in the parameters of a request,
# its inputs and its requested outputs to say how a tensor's elements are read. Those that describe a tensor as this
# server reads it are accepted and change nothing: 'np' (any tensor, as an array of its type), 'str' (UTF-8 text: the
# tensors below), 'pd' (a whole request, as a table of its inputs). Any other is refused by name: 'base64' elements,
# for one, would have to be decoded first. An unknown key is still refused: a misspelt option must not go unnoticed.
UTF8_TENSORS = frozenset({"TEXT", "TRANSLATION", "CAPTION", "TOKENS", "SOURCE_TOKENS"})
# The one key of Triton's reserved triton_* prefix that a client sends (tritonclient's enable_empty_final_response);
# Triton refuses the others. Every answer here is final, so it changes nothing.
TRITON_PARAMETERS = ("triton_enable_empty_final_response",)


# -- tensors -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A tensor as ModelMetadata and ModelConfig describe it."""

    name: str
    datatype: str  # V2 name: BYTES, FP32, INT32
    dims: tuple[int, ...]  # without the batch dimension; () is one value per batch item


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes  # row-major, little-endian; BYTES elements as 4-byte length + bytes


def inputs_for(model: Runtime) -> tuple[Spec, ...]:
    return (Spec("IMAGE" if model.family == "captioning" else "TEXT", "BYTES", (1,)),)


def outputs_for(model: Runtime) -> tuple[Spec, ...]:
    if isinstance(model, CaptionModel):
        rows, cols = model.grid
        return (Spec("CAPTION", "BYTES", (1,)), Spec("TOKENS", "BYTES", (-1,)), Spec("TARGET_LENGTHS", "INT32", ()),
                Spec("GRID", "INT32", (2,)), Spec("ATTENTION", "FP32", (-1, rows * cols)))
    return (Spec("TRANSLATION", "BYTES", (1,)), Spec("TOKENS", "BYTES", (-1,)), Spec("TARGET_LENGTHS", "INT32", ()),
            Spec("SOURCE_TOKENS", "BYTES", (-1,)), Spec("SOURCE_LENGTHS", "INT32", ()),
            Spec("ATTENTION", "FP32", (-1, -1)))


def unpack_bytes(raw: bytes, count: int | None = None, tensor: str = "raw BYTES tensor") -> list[bytes]:
    """The elements of the raw BYTES tensor ``tensor``: each a 4-byte little-endian length, then that many bytes.
    With ``count``, the number of elements its shape says: a buffer holding more is refused as soon as the one too many
    is reached, before the rest is read; one holding fewer, once it is read."""
    values: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(values) == count:
            raise InvalidInput(f"{tensor} holds more than the {_elements(count)} its shape says ({len(raw) - offset} "
                               "bytes follow)")
        if offset + 4 > len(raw):
            raise InvalidInput(f"{tensor} is truncated: {len(raw) - offset} bytes where a 4-byte length was expected")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{tensor} is truncated: an element of {size} bytes has {len(raw) - offset}")
        values.append(bytes(raw[offset : offset + size]))
        offset += size
    if count is not None and len(values) != count:
        raise InvalidInput(f"{tensor} holds {_elements(len(values))}, not the {count} its shape says")
    return values


def _elements(n: int) -> str:
    return f"{n} element" if n == 1 else f"{n} elements"


def pack_bytes(values: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def bytes_tensor(name: str, values: Sequence[bytes], shape: Sequence[int]) -> Tensor:
    return Tensor(name, "BYTES", list(shape), pack_bytes(values))


def padded_bytes(name: str, rows: Sequence[Sequence[bytes]]) -> Tensor:
    """[len(rows), longest row], shorter rows padded with b""."""
    width = max((len(r) for r in rows), default=0)
    return bytes_tensor(name, [v for r in rows for v in [*r, *[b""] * (width - len(r))]], [len(rows), width])


def array_tensor(name: str, values: np.ndarray) -> Tensor:
    dtype = {"FP32": "<f4", "INT32": "<i4"}
    datatype = "FP32" if values.dtype.kind == "f" else "INT32"
    return Tensor(name, datatype, list(values.shape), np.ascontiguousarray(values, dtype=dtype[datatype]).tobytes())


def padded_attention(matrices: Sequence[np.ndarray], cols: int | None = None) -> np.ndarray:
    """(batch, longest rows, cols or widest) float32, each matrix in its top-left corner, zeros elsewhere."""
    rows = max((m.shape[0] for m in matrices), default=0)
    cols = max((m.shape[1] for m in matrices), default=0) if cols is None else cols
    out = np.zeros((len(matrices), rows, cols), dtype=np.float32)
    for i, m in enumerate(matrices):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


def read_input(request: v2.ModelInferRequest, name: str, model: str,
               most: int) -> tuple[list[bytes], list[int]]:
    """The elements and shape of the one BYTES input ``name`` of ``model`` (the model serving the request, which may
    name none), from raw_input_contents or the typed contents. A batch of more than ``most`` (the server's
    max_texts) is refused from its shape, before any element is read: a 16 MiB buffer of empty elements is 4 million
    of them."""
    names = [t.name for t in request.inputs]
    if names != [name]:
        raise InvalidInput(f"model {echo(model)} takes one input {name} (BYTES, [batch, 1] or "
                           f"[batch]); the request has {echo(names)}")
    tensor = request.inputs[0]
    _refuse_shared_memory(tensor.parameters, f"input {name}")
    # The request's content_type says how to read its inputs (MLServer's request codecs): checked with them.
    _check_content_type(request.parameters, "the request", name, whole=True)
    _check_content_type(tensor.parameters, f"input {name}", name)
    shape = list(tensor.shape)
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {name} must be BYTES, not {echo(tensor.datatype) if tensor.datatype else 'unset'}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidInput(f"input {name} must have shape [batch, 1] or [batch] with batch >= 1, not {echo(shape)}")
    if shape[0] > most:
        raise InvalidInput(f"input {name} has a batch of {shape[0]}; the limit is {most} (max_texts)")
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise InvalidInput("send every input either in raw_input_contents or in its contents, not both")
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} input: "
                               "send one per input, in the order of inputs")
        return unpack_bytes(request.raw_input_contents[0], shape[0], f"input {name}"), shape
    contents = tensor.contents.bytes_contents
    if len(contents) != shape[0]:
        raise InvalidInput(f"input {name} holds {_elements(len(contents))}, not the {shape[0]} its shape says")
    return list(contents), shape


def requested_outputs(request: v2.ModelInferRequest, specs: Sequence[Spec], model: str) -> list[str]:
    """The outputs of ``model`` (the one serving the request) to answer with, in the order asked for."""
    names = [s.name for s in specs]
    if not request.outputs:
        return [n for n in names if n != "ATTENTION"]
    wanted = [o.name for o in request.outputs]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InvalidInput(f"model {echo(model)} has no output {cut(', '.join(unknown))}; it has {names}")
    if len(set(wanted)) != len(wanted):
        raise InvalidInput(f"an output is requested twice: {echo(wanted)}")
    # Only parameters that would change the answer are refused; others (KServe's binary_data, which a gRPC answer
    # always honours: its outputs are raw) are ignored, as Triton ignores them.
    for output in request.outputs:
        if "classification" in output.parameters:
            raise InvalidInput(f"output {output.name} asks for classification results, which this server does not "
                               "give")
        _refuse_shared_memory(output.parameters, f"output {output.name}")
        _check_content_type(output.parameters, f"output {output.name}", output.name)
    return wanted


def _refuse_shared_memory(parameters: Mapping[str, v2.InferParameter], tensor: str) -> None:
    if any(key.startswith("shared_memory_") for key in parameters):
        raise InvalidInput(f"{tensor} names a shared memory region, which this server does not support: tensors "
                           "travel in the messages")


def _check_content_type(parameters: Mapping[str, v2.InferParameter], where: str, tensor: str,
                        whole: bool = False) -> None:
    """MLServer's ``content_type`` in the parameters of ``where``: of the request (``whole``, whose one input is
    ``tensor``), of the input ``tensor`` or of the output ``tensor``; refused unless it describes ``tensor`` as this
    server reads it."""
    if "content_type" not in parameters:
        return
    param = parameters["content_type"]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{where}: parameter content_type must be a string")
    value = param.string_param
    fits = {"str": tensor in UTF8_TENSORS, "np": True, "pd": whole}
    if not value or fits.get(value, False):  # empty: none, as MLServer reads it
        return
    why = {"str": f": {tensor} is not UTF-8 text", "pd": ": a table ('pd') is a whole request"}.get(value, "")
    accepted = [repr(k) for k, ok in fits.items() if ok]
    raise InvalidInput(f"{where} has content_type {echo(value)}, which this server cannot honour{why}; it takes "
                       f"{', '.join(accepted)} or none")


def decoding_options(parameters: Mapping[str, v2.InferParameter], detail: int) -> pb.DecodingOptions:
    """The request parameters as ``attention.v1`` options, for :mod:`server.codec` to validate like any other."""
    options = pb.DecodingOptions(attention=detail)  # type: ignore[arg-type]
    for key, param in parameters.items():
        kind = param.WhichOneof("parameter_choice")
        value = getattr(param, kind) if kind else None
        if key in INT_OPTIONS:
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidInput(f"parameter {key} must be an integer")
            try:
                setattr(options, key, value)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"parameter {key}={value} is out of range") from exc
        elif key == "length_penalty":
            if kind not in ("double_param", "int64_param", "uint64_param"):  # a whole number in either integer kind
                raise InvalidInput("parameter length_penalty must be a number")
            options.length_penalty = float(value)  # type: ignore[arg-type]
        elif key == "timeout":
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidInput("parameter timeout must be an integer (microseconds)")
        elif key == "content_type":
            pass  # MLServer's: how to read the inputs, checked with them (read_input)
        elif key == "priority" or key in SEQUENCE_PARAMETERS or key.startswith("triton_"):
            _check_reserved(key, param)
        elif key not in PARAMETERS:
            raise InvalidInput(f"unknown parameter {echo(key)}; this server takes {', '.join(PARAMETERS)}")
    return options


def _check_reserved(key: str, param: v2.InferParameter) -> None:
    """Parameters that Triton reads itself and this server ignores, refused where Triton refuses them: a client that
    works here works against Triton."""
    kind = param.WhichOneof("parameter_choice")
    if key == "priority":
        if kind not in ("int64_param", "uint64_param") or param.int64_param < 0:
            raise InvalidInput("parameter priority must be an integer of 0 or more")
    elif key == "sequence_id":
        if kind not in ("int64_param", "string_param"):
            raise InvalidInput("parameter sequence_id must be an int64 or a string")
    elif key in SEQUENCE_PARAMETERS:
        if kind != "bool_param":
            raise InvalidInput(f"parameter {key} must be a bool")
    elif key not in TRITON_PARAMETERS:
        raise InvalidInput(f"parameter {echo(key)}: keys starting with 'triton_' are reserved; the one accepted is "
                           f"{', '.join(TRITON_PARAMETERS)}")
    elif kind != "bool_param":
        raise InvalidInput(f"parameter {key} must be a bool")


def time_limit(parameters: Mapping[str, v2.InferParameter], remaining: float | None) -> float | None:
    """Seconds left: the call's deadline, shortened by Triton's ``timeout`` parameter (microseconds) if smaller."""
    if "timeout" not in parameters or parameters["timeout"].WhichOneof("parameter_choice") is None:
        return remaining
    param = parameters["timeout"]
    micros = param.int64_param or param.uint64_param
    if micros <= 0:
        return remaining
    return micros / 1e6 if remaining is None else min(remaining, micros / 1e6)


def text_of(value: bytes, index: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"TEXT[{index}] is not valid UTF-8: {exc.reason} at byte {exc.start}") from None


# -- ModelStreamInfer: each message a call of its own ----------------------------------------------------------------


