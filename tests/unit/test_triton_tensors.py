"""The V2 protocol's tensor packing and request reading (server/v2_tensors.py), without a server."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from kserve_v2_pb import grpc_service_pb2 as v2
from server.errors import FieldError, InvalidInput
from server.imaging import ImageError
from server.metrics import Metrics
from server.service import AttentionServicer
from server.settings import Settings
from server.triton import TritonServicer, version_policy
from server.v2_tensors import (
    Spec,
    array_tensor,
    decoding_options,
    pack_bytes,
    padded_attention,
    padded_bytes,
    read_input,
    requested_outputs,
    time_limit,
    unpack_bytes,
)
from tests.unit.test_caption_service import CallContext

VALUES = [b"Guten Morgen.", b"", "groß".encode(), bytes(range(256))]


def request(values: list[bytes], shape: list[int], raw: bool = True, name: str = "TEXT") -> v2.ModelInferRequest:
    req = v2.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name=name, datatype="BYTES", shape=shape)
    if raw:
        req.raw_input_contents.append(pack_bytes(values))
    else:
        tensor.contents.bytes_contents.extend(values)
    return req


def request_of(raw: bytes, shape: list[int]) -> v2.ModelInferRequest:
    """A TEXT input of ``shape`` whose raw contents are ``raw``, whatever it holds."""
    req = request([], shape)
    req.raw_input_contents[0] = raw
    return req


def test_bytes_round_trip_and_the_stock_clients_encoding() -> None:
    raw = pack_bytes(VALUES)
    assert unpack_bytes(raw) == VALUES
    utils = pytest.importorskip("tritonclient.utils")
    assert utils.serialize_byte_tensor(np.array(VALUES, dtype=object)).item() == raw
    assert list(utils.deserialize_bytes_tensor(raw)) == VALUES


@pytest.mark.parametrize("raw", [b"\x05\x00", b"\x05\x00\x00\x00abc"])
def test_truncated_bytes_are_invalid_input(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match="truncated"):
        unpack_bytes(raw)


def test_a_raw_buffer_of_more_elements_than_the_shape_is_refused_when_the_one_too_many_is_reached() -> None:
    """The elements are counted as they are read: the buffer ends in a length that runs past its end, which reading
    it all would report (as it did before, after listing 100,000 elements); the refusal names the count instead."""
    raw = pack_bytes([b"Guten Morgen."] * 100_000) + b"\xff\xff\xff\x7f"
    with pytest.raises(InvalidInput, match="input TEXT holds more than the 2 elements its shape says"):
        read_input(request_of(raw, [2, 1]), "TEXT", "m", 32)
    with pytest.raises(InvalidInput, match="raw BYTES tensor holds more than the 2 elements"):
        unpack_bytes(raw, 2)
    assert unpack_bytes(pack_bytes(VALUES), len(VALUES)) == VALUES
    with pytest.raises(InvalidInput, match="truncated"):  # a length past the end before the count is reached
        unpack_bytes(pack_bytes([b"a"]) + b"\x05\x00\x00\x00ab", 2)
    for packed in (True, False):  # and fewer, in either kind of contents
        with pytest.raises(InvalidInput, match="input TEXT holds 4 elements, not the 5 its shape says"):
            read_input(request(VALUES, [5], packed), "TEXT", "m", 32)


def test_a_batch_over_max_texts_is_refused_from_its_shape_before_any_element_is_read() -> None:
    """Before, every element was listed first (4 million empty ones fit in 16 MiB, some 2 s of the event loop) and
    the batch compared with max_texts only afterwards. The buffer here is not even well formed: reading it would
    fail differently."""
    with pytest.raises(InvalidInput, match=r"input TEXT has a batch of 4000000; the limit is 32 \(max_texts\)"):
        read_input(request_of(b"\xff" * 5, [4_000_000]), "TEXT", "m", 32)
    typed = request(VALUES, [4], raw=False)
    with pytest.raises(InvalidInput, match="input TEXT has a batch of 4; the limit is 3"):
        read_input(typed, "TEXT", "m", 3)
    assert read_input(typed, "TEXT", "m", 4) == (VALUES, [4])


def test_padding() -> None:
    tensor = padded_bytes("TOKENS", [[b"a", b"b"], [b"c"]])
    assert tensor.shape == [2, 2] and unpack_bytes(tensor.raw) == [b"a", b"b", b"c", b""]
    matrices = [np.full((2, 3), 0.5, np.float32), np.ones((1, 1), np.float32)]
    padded = padded_attention(matrices)
    assert padded.shape == (2, 2, 3) and padded[1, 0, 0] == 1 and padded[1].sum() == 1
    assert padded_attention(matrices, cols=5).shape == (2, 2, 5)
    lengths = array_tensor("TARGET_LENGTHS", np.array([3, 1]))
    assert (lengths.datatype, lengths.shape) == ("INT32", [2])
    assert np.frombuffer(lengths.raw, "<i4").tolist() == [3, 1]
    weights = array_tensor("ATTENTION", padded)
    assert weights.datatype == "FP32" and np.array_equal(np.frombuffer(weights.raw, "<f4").reshape(2, 2, 3), padded)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("shape", [[4], [4, 1]])
def test_read_input_raw_or_typed(raw: bool, shape: list[int]) -> None:
    assert read_input(request(VALUES, shape, raw), "TEXT", "m", 32) == (VALUES, shape)


@pytest.mark.parametrize(("req", "words"), [
    (request(VALUES, [2, 2]), "shape"),
    (request(VALUES, [3]), "more than the 3 elements"),
    (request(VALUES, [3], raw=False), "4 elements, not the 3"),
    (request([], [0]), "batch >= 1"),
    (request(VALUES, [4], name="IMAGE"), "takes one input TEXT"),
])
def test_read_input_refusals(req: v2.ModelInferRequest, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        read_input(req, "TEXT", "m", 32)


def test_read_input_wants_bytes_and_one_kind_of_contents() -> None:
    req = request(VALUES, [4])
    req.inputs[0].datatype = "FP32"
    with pytest.raises(InvalidInput, match="BYTES"):
        read_input(req, "TEXT", "m", 32)
    both = request(VALUES, [4])
    both.inputs[0].contents.bytes_contents.append(b"x")
    with pytest.raises(InvalidInput, match="not both"):
        read_input(both, "TEXT", "m", 32)
    extra = request(VALUES, [4])
    extra.raw_input_contents.append(pack_bytes(VALUES))
    with pytest.raises(InvalidInput, match="2 raw_input_contents for 1 input"):
        read_input(extra, "TEXT", "m", 32)


def test_a_refusal_names_the_model_that_serves_the_request_when_it_names_none() -> None:
    """Before, it named the request's empty model_name: "model '' takes one input TEXT"."""
    unnamed = request(VALUES, [4], name="IMAGE")
    unnamed.model_name = ""  # the server's default model serves it
    with pytest.raises(InvalidInput, match="model 'de-en' takes one input TEXT"):
        read_input(unnamed, "TEXT", "de-en", 32)
    unnamed.outputs.add(name="LOGITS")
    with pytest.raises(InvalidInput, match="model 'de-en' has no output LOGITS"):
        requested_outputs(unnamed, [Spec("TRANSLATION", "BYTES", (1,))], "de-en")


def test_requested_outputs() -> None:
    specs = [Spec("TRANSLATION", "BYTES", (1,)), Spec("ATTENTION", "FP32", (-1, -1))]
    req = v2.ModelInferRequest(model_name="m")
    assert requested_outputs(req, specs, "m") == ["TRANSLATION"]  # ATTENTION only when named
    req.outputs.add(name="ATTENTION")
    assert requested_outputs(req, specs, "m") == ["ATTENTION"]
    req.outputs.add(name="LOGITS")
    with pytest.raises(InvalidInput, match="no output LOGITS"):
        requested_outputs(req, specs, "m")


def test_output_parameters_this_server_cannot_honour_are_refused_by_name() -> None:
    """binary_data (what a KServe request converted from REST carries) is what gRPC answers always are, so it is
    ignored, as Triton ignores it; classification and shared memory would change the answer, so they are refused."""
    specs = [Spec("TRANSLATION", "BYTES", (1,))]
    req = v2.ModelInferRequest(model_name="m")
    req.outputs.add(name="TRANSLATION").parameters["binary_data"].bool_param = True
    assert requested_outputs(req, specs, "m") == ["TRANSLATION"]
    for key, words in (("classification", "classification"), ("shared_memory_region", "shared memory")):
        refused = v2.ModelInferRequest(model_name="m")
        refused.outputs.add(name="TRANSLATION").parameters[key].string_param = "x"
        with pytest.raises(InvalidInput, match=f"output TRANSLATION.*{words}"):
            requested_outputs(refused, specs, "m")


def test_an_input_in_shared_memory_is_refused_as_such() -> None:
    req = request([], [1], raw=False)
    req.inputs[0].parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(InvalidInput, match="input TEXT.*shared memory"):
        read_input(req, "TEXT", "m", 32)


def with_content_type(req: v2.ModelInferRequest, value: str, where: str = "request") -> v2.ModelInferRequest:
    """``req`` with MLServer's ``content_type`` in the parameters of the request, its input or its first output."""
    tensor = {"request": req, "input": req.inputs[0] if req.inputs else None,
              "output": req.outputs[0] if req.outputs else None}[where]
    assert tensor is not None
    tensor.parameters["content_type"].string_param = value
    return req


@pytest.mark.parametrize(("where", "value"), [
    ("request", "str"),  # MLServer's StringRequestCodec: the one input, as UTF-8 strings
    ("request", "np"),  # NumpyRequestCodec: the one input, as an array
    ("request", "pd"),  # PandasCodec: the inputs as the columns of a table
    ("input", "str"),  # StringCodec, and PandasCodec's label of a column of strings
    ("input", "np"),  # NumpyCodec
    ("input", ""),  # none, as MLServer reads it
])
def test_mlserver_content_types_that_describe_the_text_input_are_accepted(where: str, value: str) -> None:
    """Clients built on MLServer's codecs (Seldon's among them) send ``content_type``; before, the request's was
    refused as an unknown parameter. It says how to read the elements, as this server reads them here."""
    req = with_content_type(request(VALUES, [4, 1]), value, where)
    assert read_input(req, "TEXT", "m", 32) == (VALUES, [4, 1])
    assert decoding_options(req.parameters, 1) == decoding_options(v2.ModelInferRequest().parameters, 1)


def test_mlserver_content_types_of_outputs_that_describe_them_are_accepted() -> None:
    specs = [Spec("TRANSLATION", "BYTES", (1,)), Spec("ATTENTION", "FP32", (-1, -1))]
    req = v2.ModelInferRequest(model_name="m")
    req.outputs.add(name="TRANSLATION").parameters["content_type"].string_param = "str"
    req.outputs.add(name="ATTENTION").parameters["content_type"].string_param = "np"
    assert requested_outputs(req, specs, "m") == ["TRANSLATION", "ATTENTION"]


@pytest.mark.parametrize(("req", "words"), [
    # Before, every one of these was read as if it had no content_type: base64 texts translated as they were.
    (with_content_type(request(VALUES, [4]), "base64", "input"),
     "input TEXT has content_type 'base64', which this server cannot honour; it takes 'str', 'np' or none"),
    (with_content_type(request(VALUES, [4]), "datetime", "input"), "input TEXT has content_type 'datetime'"),
    (with_content_type(request(VALUES, [4]), "pd", "input"), "input TEXT has content_type 'pd'.*a whole request"),
    (with_content_type(request(VALUES, [4], name="IMAGE"), "str", "input"),
     "input IMAGE has content_type 'str'.*IMAGE is not UTF-8 text; it takes 'np' or none"),
    (with_content_type(request(VALUES, [4], name="IMAGE"), "str"),
     "the request has content_type 'str'.*IMAGE is not UTF-8 text; it takes 'np', 'pd' or none"),
    (with_content_type(request(VALUES, [4]), "pd_json"), "the request has content_type 'pd_json'"),
], ids=["base64", "datetime", "pd-input", "str-image", "str-image-request", "pd_json-request"])
def test_mlserver_content_types_this_server_cannot_honour_are_refused_by_name(req: v2.ModelInferRequest,
                                                                              words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        read_input(req, req.inputs[0].name, "m", 32)


def test_content_type_is_a_string_and_an_outputs_must_describe_it() -> None:
    number = request(VALUES, [4])
    number.inputs[0].parameters["content_type"].int64_param = 1
    with pytest.raises(InvalidInput, match="input TEXT: parameter content_type must be a string"):
        read_input(number, "TEXT", "m", 32)
    specs = [Spec("TRANSLATION", "BYTES", (1,)), Spec("ATTENTION", "FP32", (-1, -1))]
    req = v2.ModelInferRequest(model_name="m")
    req.outputs.add(name="ATTENTION").parameters["content_type"].string_param = "str"
    with pytest.raises(InvalidInput, match="output ATTENTION has content_type 'str'.*ATTENTION is not UTF-8 text"):
        requested_outputs(req, specs, "m")


def test_parameters_become_decoding_options() -> None:
    params = v2.ModelInferRequest().parameters
    params["beam_size"].int64_param = 3
    params["length_penalty"].double_param = 0.6
    params["attention_head"].int64_param = -1
    params["priority"].uint64_param = 2
    params["triton_enable_empty_final_response"].bool_param = True
    options = decoding_options(params, 1)
    assert (options.beam_size, options.attention_head, options.attention) == (3, -1, 1)
    assert options.length_penalty == pytest.approx(0.6)
    params["nbest"].int64_param = 2
    with pytest.raises(InvalidInput, match="unknown parameter 'nbest'"):
        decoding_options(params, 1)
    for key, setter in (("beam_size", "string_param"), ("length_penalty", "bool_param")):
        bad = v2.ModelInferRequest().parameters
        setattr(bad[key], setter, "4" if setter == "string_param" else True)
        with pytest.raises(InvalidInput, match=key):
            decoding_options(bad, 1)
    whole = v2.ModelInferRequest().parameters
    whole["length_penalty"].uint64_param = 1  # as the integer options take either integer kind (refused before)
    assert decoding_options(whole, 1).length_penalty == 1.0
    negative = v2.ModelInferRequest().parameters
    negative["beam_size"].int64_param = -1
    with pytest.raises(InvalidInput, match="out of range"):
        decoding_options(negative, 1)


@pytest.mark.parametrize(("key", "setter", "value"), [
    ("priority", "string_param", "high"),
    ("priority", "int64_param", -1),
    ("priority", "double_param", 1.5),
    ("triton_enable_empty_final_response", "int64_param", 1),
    ("triton_something_else", "bool_param", True),
    ("sequence_id", "uint64_param", 7),  # Triton: int64_param or string_param
    ("sequence_id", "double_param", 7.0),
    ("sequence_start", "int64_param", 1),
    ("sequence_end", "string_param", "true"),
])
def test_triton_reserved_parameters_are_checked_as_triton_checks_them(key: str, setter: str, value: object) -> None:
    params = v2.ModelInferRequest().parameters
    setattr(params[key], setter, value)
    with pytest.raises(InvalidInput, match=key):
        decoding_options(params, 1)


@pytest.mark.parametrize(("key", "setter", "value"), [
    ("priority", "uint64_param", 3),
    ("priority", "int64_param", 0),
    ("triton_enable_empty_final_response", "bool_param", False),
    # Triton ignores a sequence for a model without sequence batching, as every model here is; before, each of these
    # was refused as an unknown parameter.
    ("sequence_id", "int64_param", 7),
    ("sequence_id", "string_param", "conversation-7"),
    ("sequence_start", "bool_param", True),
    ("sequence_end", "bool_param", False),
])
def test_triton_reserved_parameters_of_the_right_type_are_accepted(key: str, setter: str, value: object) -> None:
    params = v2.ModelInferRequest().parameters
    setattr(params[key], setter, value)
    assert decoding_options(params, 1) == decoding_options(v2.ModelInferRequest().parameters, 1)


def test_time_limit_takes_the_shorter_of_deadline_and_timeout() -> None:
    params = v2.ModelInferRequest().parameters
    assert time_limit(params, None) is None and time_limit(params, 5.0) == 5.0
    params["timeout"].int64_param = 2_000_000  # microseconds
    assert time_limit(params, None) == 2.0 and time_limit(params, 5.0) == 2.0 and time_limit(params, 1.0) == 1.0


@pytest.mark.parametrize(("policy", "pins", "expected"), [
    ("latest", "", {"latest": {"num_versions": 1}}),
    ("all", "", {"all": {}}),
    ("all", "de-en=3", {"specific": {"versions": ["3"]}}),  # int64 in JSON: a string
    ("all", "de-en=beta", {"latest": {"num_versions": 1}}),  # one version, which Triton cannot name
    ("all", "other=3", {"all": {}}),
])
def test_the_version_policy_is_the_servers(policy: str, pins: str, expected: dict[str, object]) -> None:
    found = version_policy("de-en", Settings(version_policy=policy, pinned_versions=pins))
    assert MessageToDict(found, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) == expected


def test_a_field_error_renamed_keeps_its_kind_and_problem() -> None:
    text = FieldError("texts", 2, "is empty or only whitespace")
    assert str(text) == "texts[2] is empty or only whitespace"
    assert str(text.renamed("TEXT")) == "TEXT[2] is empty or only whitespace"
    image = ImageError("is empty (0 bytes)")
    assert str(image) == "image is empty (0 bytes)"
    renamed = image.renamed("IMAGE", 1)
    assert type(renamed) is ImageError and str(renamed) == "IMAGE[1] is empty (0 bytes)"


def test_repository_index_asked_for_ready_models_lists_none_while_the_server_loads() -> None:
    """``ready: true`` asks for the models ready for inference only: while the server is still loading (its models
    listed as UNAVAILABLE), there is none."""
    class Loading:
        ready, default_model = False, "m"

        def models(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(name="m", version="1")]

    with ThreadPoolExecutor(1) as pool:
        core = AttentionServicer(Loading(), pool, Settings(), Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                                 lambda: False)
        servicer = TritonServicer(core)
        context: Any = CallContext(10)

        async def index(ready: bool) -> v2.RepositoryIndexResponse:
            return await servicer.RepositoryIndex(v2.RepositoryIndexRequest(ready=ready), context)

        every, ready = asyncio.run(index(False)), asyncio.run(index(True))
    assert [(m.name, m.version, m.state) for m in every.models] == [("m", "1", "UNAVAILABLE")]
    assert list(ready.models) == []
