"""The Triton / KServe V2 inference protocol (``inference.GRPCInferenceService``) on the server's own port, so that
stock V2 clients (tritonclient, perf_analyzer, KServe) reach the same models, scheduler, limits and metrics as
``attention.v1``. Requests are validated by :mod:`server.codec` and run on :class:`AttentionServicer`'s inference path.

A model is a set of named tensors (shapes with the batch dimension first, -1 where it varies)::

    TEXT            BYTES  [batch, 1] or [batch]       in, translation: UTF-8 texts, translated as one batch
    IMAGE           BYTES  [batch, 1] or [batch]       in, captioning: encoded images (PNG, JPEG, WebP, BMP, GIF)
    TRANSLATION     BYTES  as TEXT                     the best translation of each text
    CAPTION         BYTES  as IMAGE                    the best caption of each image
    TOKENS          BYTES  [batch, max target tokens]  its token pieces, end of sentence included, padded with b""
    TARGET_LENGTHS  INT32  [batch]                     how many of them are real
    SOURCE_TOKENS   BYTES  [batch, max source tokens]  translation: the pieces of each text, end of sentence included
    SOURCE_LENGTHS  INT32  [batch]                     translation: how many of them are real
    GRID            INT32  [batch, 2]                  captioning: rows and columns of the attention grid
    ATTENTION       FP32   [batch, max target tokens, max source tokens]  translation, zero padded
                           [batch, max target tokens, grid cells]         captioning (cells row-major), zero padded

Row ``i`` of ``ATTENTION[b]`` is target token ``i``'s distribution over the columns: it sums to 1 over the first
``SOURCE_LENGTHS[b]`` columns. ATTENTION is the one large output and the one that needs alignment work, so it is
computed only when a request names it; a request naming no outputs gets every other one. Request parameters:
``beam_size``, ``max_output_tokens``, ``length_penalty``, ``attention_layer`` and ``attention_head`` mean what they mean
in ``attention.v1.DecodingOptions``; Triton's ``timeout`` (microseconds) shortens the call's deadline, and its
``sequence_id``, ``sequence_start`` and ``sequence_end`` are ignored, as Triton ignores them for a model without
sequence batching (each request stands alone). MLServer's ``content_type`` (of the request, an input or an output) is
taken where it describes the tensors as they are read here (``np``; ``str`` on text; ``pd`` on the request) and refused
otherwise.

``ServerLive`` and ``ServerReady`` are probes (like ``grpc.health.v1``) and go unlogged; every other call goes through
:func:`server.service.rpc` under its V2 name, ModelStreamInfer once per message. In a stream each answer carries
``triton_final_response: true``; an error answers that message (``error_message``, prefixed with the status code name)
and the stream goes on, as in Triton.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from importlib import metadata
from typing import Any, NoReturn, cast

import grpc
import numpy as np
from google.protobuf import descriptor, descriptor_pool

import kserve_v2_pb
from attention_pb.v1 import attention_pb2 as pb
from kserve_v2_pb import grpc_service_pb2 as v2
from kserve_v2_pb import grpc_service_pb2_grpc as v2_grpc
from kserve_v2_pb import model_config_pb2 as mc
from server import codec, wire
from server.captioning import CaptionModel
from server.errors import FieldError, ModelNotFound, NotReady, Unimplemented
from server.service import AttentionServicer, Call, rpc
from server.settings import Settings, parse_pins
from server.translation import TranslationModel
from server.v2_tensors import (
    Spec,
    Tensor,
    array_tensor,
    bytes_tensor,
    decoding_options,
    inputs_for,
    outputs_for,
    padded_attention,
    padded_bytes,
    read_input,
    requested_outputs,
    text_of,
    time_limit,
)

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "attention-serving"
CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32}
FINAL_RESPONSE = "triton_final_response"  # the response parameter ending a request in a stream


class _Failed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _MessageContext:
    """One message of a stream as :func:`rpc` sees a call: same metadata and deadline, and ``abort`` answers the
    message (:class:`_Failed`) instead of ending the stream."""

    def __init__(self, stream: grpc.aio.ServicerContext) -> None:
        self._stream = stream

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    def time_remaining(self) -> float | None:
        return self._stream.time_remaining()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass  # a message has none; the request id is in the log line

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise _Failed(code, details)


def _unimplemented(name: str) -> Any:
    async def handler(self: TritonServicer, request: Any, context: grpc.aio.ServicerContext, call: Call) -> Any:
        raise Unimplemented(f"{name} is not implemented by this server")

    return rpc(name)(handler)


# -- the servicer ----------------------------------------------------------------------------------------------------


class TritonServicer(v2_grpc.GRPCInferenceServiceServicer):
    """V2 calls on the inference path of :class:`AttentionServicer`: the same models, scheduler and metrics."""

    def __init__(self, core: AttentionServicer) -> None:
        self.core = core
        self.models, self.settings, self.metrics = core.models, core.settings, core.metrics
        self.shutting_down: Callable[[], bool] = core.shutting_down
        self.unanswered = core.unanswered

    async def ServerLive(self, request: v2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.models.ready and not self.shutting_down())

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext,
                             call: Call) -> v2.ServerMetadataResponse:
        try:
            version = metadata.version(SERVER_NAME)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=version,
                                         extensions=["model_configuration", "parameters"])

    @rpc("ModelReady")
    async def ModelReady(self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext,
                         call: Call) -> v2.ModelReadyResponse:
        try:
            model = self.models.get(request.name, request.version)
        except (ModelNotFound, NotReady):
            return v2.ModelReadyResponse(ready=False)
        call.model, call.version = model.name, model.version
        return v2.ModelReadyResponse(ready=True)

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext,
                            call: Call) -> v2.ModelMetadataResponse:
        model = self.models.get(request.name, request.version)
        call.model, call.version = model.name, model.version
        versions = [m.version for m in self.models.models() if m.name == model.name]

        def described(specs: Sequence[Spec]) -> list[v2.ModelMetadataResponse.TensorMetadata]:
            return [v2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=[-1, *s.dims])
                    for s in specs]

        return v2.ModelMetadataResponse(
            name=model.name, versions=[model.version] if request.version else versions,
            platform=f"attention_{model.family}", inputs=described(inputs_for(model)),
            outputs=described(outputs_for(model)),
        )

    @rpc("ModelConfig")
    async def ModelConfig(self, request: v2.ModelConfigRequest, context: grpc.aio.ServicerContext,
                          call: Call) -> v2.ModelConfigResponse:
        model = self.models.get(request.name, request.version)
        call.model, call.version = model.name, model.version
        info = model.info()
        config = mc.ModelConfig(
            name=model.name, platform=f"attention_{model.family}", max_batch_size=self.settings.max_texts,
            version_policy=version_policy(model.name, self.settings),
            input=[mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.datatype], dims=s.dims)
                   for s in inputs_for(model)],
            # One value per batch item: dims [1] reshaped to [], as Triton writes it.
            output=[mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.datatype],
                                   dims=s.dims or (1,), reshape=None if s.dims else mc.ModelTensorReshape(shape=[]))
                    for s in outputs_for(model)],
            instance_group=[mc.ModelInstanceGroup(
                kind=mc.ModelInstanceGroup.KIND_GPU if info.get("device") == "cuda" else mc.ModelInstanceGroup.KIND_CPU,
                count=self.settings.workers)],
            parameters={k: mc.ModelParameter(string_value=v if isinstance(v, str) else json.dumps(v))
                        for k, v in info.items()},
        )
        return v2.ModelConfigResponse(config=config)

    @rpc("RepositoryIndex")
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context: grpc.aio.ServicerContext,
                              call: Call) -> v2.RepositoryIndexResponse:
        state = "READY" if self.models.ready else "UNAVAILABLE"
        if request.ready and state != "READY":  # the client asks for the models ready for inference only
            return v2.RepositoryIndexResponse()
        return v2.RepositoryIndexResponse(models=[
            v2.RepositoryIndexResponse.ModelIndex(name=m.name, version=m.version, state=state)
            for m in self.models.models()
        ])

    @rpc("ModelInfer")
    async def ModelInfer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext,
                         call: Call) -> v2.ModelInferResponse:
        return await self._infer(request, context, call)

    async def ModelStreamInfer(self, request_iterator: Any,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Answers the messages in order, one at a time, each with its ``id``. When the server drains, the stream
        ends with UNAVAILABLE once the message in progress is answered: clients keep their stream open between
        messages, and waiting for them to close it would hold the drain for the whole grace period."""
        message = cast(grpc.aio.ServicerContext, _MessageContext(context))
        messages = aiter(request_iterator)
        ending = asyncio.ensure_future(self.core.streams_end.wait())
        reading: asyncio.Future[Any] | None = None
        try:
            while not ending.done():
                reading = asyncio.ensure_future(anext(messages))
                await asyncio.wait({reading, ending}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    break
                try:
                    request = reading.result()
                except StopAsyncIteration:
                    return
                try:
                    response = await self._stream_message(request, message)
                except _Failed as failed:
                    answered = v2.ModelInferResponse() if isinstance(request, wire.Malformed) else (
                        v2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                              id=request.id))
                    yield v2.ModelStreamInferResponse(error_message=f"{failed.code.name}: {failed.details}",
                                                      infer_response=answered)
                    continue
                yield v2.ModelStreamInferResponse(infer_response=response)
        finally:
            ending.cancel()
            if reading is not None:  # the call ended (cancelled, or the drain) while a read was pending
                if reading.done() and not reading.cancelled():
                    reading.exception()  # retrieved: the stream's end (StopAsyncIteration) is no error
                reading.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another instance")

    @rpc("ModelStreamInfer", streamed=True)
    async def _stream_message(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext,
                              call: Call) -> v2.ModelInferResponse:
        response = await self._infer(request, context, call)
        # A message has one answer, so it is its request's last. Triton marks every answer of a stream this way, and
        # clients that also talk to decoupled models wait for the mark before they take a request as done. Set here,
        # before rpc() sizes the answer against max_send_bytes.
        response.parameters[FINAL_RESPONSE].bool_param = True
        return response

    ModelStatistics = _unimplemented("ModelStatistics")
    RepositoryModelLoad = _unimplemented("RepositoryModelLoad")
    RepositoryModelUnload = _unimplemented("RepositoryModelUnload")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")

    # -- inference ---------------------------------------------------------------------------------------------

    async def _infer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext,
                     call: Call) -> v2.ModelInferResponse:
        model = self.models.get(request.model_name, request.model_version)
        call.model, call.version = model.name, model.version
        wanted = requested_outputs(request, outputs_for(model), model.name)
        timeout = time_limit(request.parameters, context.time_remaining())
        options = decoding_options(request.parameters, codec.FULL if "ATTENTION" in wanted else codec.NONE)
        async with self.core.admitted():
            if isinstance(model, TranslationModel):
                tensors, inline = await self._translate(model, request, options, timeout, call)
            elif isinstance(model, CaptionModel):
                tensors, inline = await self._caption(model, request, options, timeout, call), False
            else:
                raise Unimplemented(f"model {model.name!r} is a {model.family} model, which has no V2 tensors")
            chosen = await self.core.offload(lambda: [tensors[name]() for name in wanted], inline=inline)
        if "ATTENTION" in wanted:
            self.metrics.attention_bytes.labels(call.rpc, model.name).observe(
                sum(len(t.raw) for t in chosen if t.name == "ATTENTION"))
        return v2.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id,
            outputs=[v2.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                     for t in chosen],
            raw_output_contents=[t.raw for t in chosen],
        )

    async def _translate(self, model: TranslationModel, request: v2.ModelInferRequest, options: pb.DecodingOptions,
                         timeout: float | None, call: Call) -> tuple[dict[str, Callable[[], Tensor]], bool]:
        """The output tensors, built when asked for, and whether to build them on the event loop (as Translate
        answers a call of the same size)."""
        values, shape = read_input(request, "TEXT", model.name, self.settings.max_texts)
        texts = [text_of(v, i) for i, v in enumerate(values)]
        inline = self.core.inline_texts(texts)
        try:
            job = await self.core.offload(codec.translate_job, pb.TranslateRequest(texts=texts, options=options),
                                          model, self.settings, inline=inline)
        except FieldError as exc:  # it names attention.v1's texts[i]
            raise exc.renamed("TEXT") from exc
        job.options = replace(job.options, word_alignments=False)  # no V2 tensor carries them
        call.fields = {"texts": len(job.sources), "beam_size": job.options.beam_size}
        inline = inline and self.core.inline_answers(job)
        results = await self.core.run_translate(model, job, timeout, inline=inline)
        sources = [r.source for r in results]
        best = [r.hypotheses[0] for r in results]
        source_tokens, target_tokens = sum(len(s.tokens) for s in sources), sum(len(t.tokens) for t in best)
        self.metrics.count_tokens(model.name, model.version, source_tokens, target_tokens)
        call.fields.update(source_tokens=source_tokens, target_tokens=target_tokens)
        return {
            "TRANSLATION": lambda: bytes_tensor("TRANSLATION", [t.text.encode() for t in best], shape),
            "TOKENS": lambda: padded_bytes("TOKENS", [[k.piece.encode() for k in t.tokens] for t in best]),
            "TARGET_LENGTHS": lambda: array_tensor("TARGET_LENGTHS", np.array([len(t.tokens) for t in best])),
            "SOURCE_TOKENS": lambda: padded_bytes("SOURCE_TOKENS", [[k.piece.encode() for k in s.tokens]
                                                                    for s in sources]),
            "SOURCE_LENGTHS": lambda: array_tensor("SOURCE_LENGTHS", np.array([len(s.tokens) for s in sources])),
            "ATTENTION": lambda: array_tensor("ATTENTION", padded_attention([t.attention for t in best])),
        }, inline

    async def _caption(self, model: CaptionModel, request: v2.ModelInferRequest, options: pb.DecodingOptions,
                       timeout: float | None, call: Call) -> dict[str, Callable[[], Tensor]]:
        images, shape = read_input(request, "IMAGE", model.name, self.settings.max_texts)
        jobs = []  # every image's options and size are checked before any is decoded
        for i, image in enumerate(images):
            try:
                jobs.append(codec.caption_job(pb.CaptionRequest(image=image, options=options), model, self.settings))
            except FieldError as exc:  # it names attention.v1's one image
                raise exc.renamed("IMAGE", i) from exc
        call.fields = {"images": len(jobs), "image_bytes": sum(len(i) for i in images),
                       "beam_size": jobs[0].options.beam_size}
        # One request to the model's engine, as a batch of texts is: decoded in one batch, and counted once in its
        # queue; an image that does not decode is named IMAGE[i].
        results = await self.core.run_captions(model, jobs, timeout, field="IMAGE")
        best = [r.hypotheses[0] for r in results]
        target_tokens = sum(len(h.tokens) for h in best)
        self.metrics.count_tokens(model.name, model.version, 0, target_tokens)
        self.metrics.images.labels(model.name, model.version).inc(len(results))
        call.fields.update(target_tokens=target_tokens)
        cells = model.grid[0] * model.grid[1]
        return {
            "CAPTION": lambda: bytes_tensor("CAPTION", [h.text.encode() for h in best], shape),
            "TOKENS": lambda: padded_bytes("TOKENS", [[k.piece.encode() for k in h.tokens] for h in best]),
            "TARGET_LENGTHS": lambda: array_tensor("TARGET_LENGTHS", np.array([len(h.tokens) for h in best])),
            "GRID": lambda: array_tensor("GRID", np.array([r.grid for r in results])),
            "ATTENTION": lambda: array_tensor("ATTENTION", padded_attention([h.attention for h in best], cells)),
        }


def version_policy(name: str, settings: Settings) -> mc.ModelVersionPolicy:
    """Which versions of model ``name`` the server serves, in Triton's terms: the one pinned (``specific``, where its
    name is a number, as Triton's versions are), the highest (``latest``), or every one (``all``)."""
    pinned = parse_pins(settings.pinned_versions).get(name)
    if pinned is not None and pinned.isdigit():
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[int(pinned)]))
    if pinned is not None or settings.version_policy == "latest":
        return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1))
    return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())


def add_to_server(core: AttentionServicer, server: grpc.aio.Server) -> None:
    """Serves the V2 protocol next to ``attention.v1`` on the same server, on ``core``'s inference path."""
    wire.add_servicer(server, TritonServicer(core), v2.DESCRIPTOR.services_by_name["GRPCInferenceService"])


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool describing every named service for server reflection, wherever its descriptors live: the V2 protocol's
    are in ``kserve_v2_pb.POOL``, the others in protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for name in service_names:
        for source in (kserve_v2_pb.POOL, descriptor_pool.Default()):
            try:
                add(source.FindServiceByName(name).file)
                break
            except KeyError:
                continue
    return pool
