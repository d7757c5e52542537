"""The ``attention.v1.AttentionService`` servicer: proto in, domain call, proto out. Nothing else lives here.

:func:`rpc` wraps every method once: request id, structured log line, metrics, and the conversion of exceptions into
status codes (through :func:`server.errors.to_status`, the only place that knows the mapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from attention_pb.v1 import attention_pb2 as pb
from attention_pb.v1 import attention_pb2_grpc as pb_grpc
from server import codec, logs
from server.captioning import CaptionModel, CaptionResult
from server.drain import Unanswered
from server.errors import (
    AnswerTooLarge,
    Cancelled,
    DeadlineExceeded,
    FieldError,
    InvalidInput,
    ModelNotFound,
    ShuttingDown,
    TooManyCalls,
    cancellation_code,
    to_status,
)
from server.imaging import decode
from server.inflight import CallsInFlight
from server.metrics import Metrics
from server.models import Models
from server.search import Hypothesis
from server.settings import Settings
from server.translation import Result, TranslationModel
from server.wire import Malformed

log = logging.getLogger("attn.rpc")

REQUEST_ID_KEY = "x-request-id"
# Status codes that mean the request was refused or stopped, and the metric's reason for each (an error whose code
# has other causes too names its own: ServiceError.refusal).
REFUSALS = {"RESOURCE_EXHAUSTED": "queue_full", "DEADLINE_EXCEEDED": "deadline", "CANCELLED": "cancelled",
            "INVALID_ARGUMENT": "invalid"}
# What a message of a stream adds to its answer: ModelStreamInferResponse's field tag and the answer's length.
STREAM_ENVELOPE = 6
# Translations within both bounds (Translate calls, V2 inferences) are tokenized and answered on the event loop,
# where a worker thread would hold the interpreter lock for the same work and add two hops: at the bounds (16 texts,
# 1,825 characters, the bundled model) the work takes about 3 ms, under the 5 ms after which Python hands the lock to
# another thread. So a call within them delays the loop no more than the pool would; anything longer goes to the
# pool, which lets the loop take turns with it.
INLINE_CHARS = 2000
INLINE_HYPOTHESES = 16
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass
class Call:
    """Per-call facts the wrapper logs and counts; handlers fill in the model once they know it."""

    rpc: str
    request_id: str
    model: str = ""
    version: str = ""
    fields: dict[str, Any] | None = None


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(8).hex()


def rpc(name: str, streamed: bool = False) -> Callable[
    [Callable[[Any, Req, grpc.aio.ServicerContext, Call], Awaitable[Resp]]],
    Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
]:
    """``streamed``: each message of a stream is a call of its own here; its answer leaves with the stream, so a
    drain does not wait for it (:class:`server.drain.Unanswered` counts unary calls)."""
    def decorate(handler: Callable[[Any, Req, grpc.aio.ServicerContext, Call], Awaitable[Resp]]) -> Callable[
            [Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
        @functools.wraps(handler)
        async def wrapper(self: AttentionServicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            call = Call(name, _request_id(context))
            token = logs.request_id.set(call.request_id)
            started = time.monotonic()
            code, error, internal, recorded = grpc.StatusCode.OK, "", False, False
            refusal = ""
            self.metrics.inflight.labels(name).inc()
            if not streamed:
                self.unanswered.begin(context)
            logs.event(log, "rpc_received", level=logging.DEBUG, rpc=name)
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))

            def record() -> None:
                nonlocal recorded
                recorded = True
                seconds = time.monotonic() - started
                if refusal or code.name in REFUSALS:
                    self.metrics.refusals.labels(name, refusal or REFUSALS[code.name]).inc()
                self.metrics.inflight.labels(name).dec()
                self.metrics.observe(name, call.model, call.version, code.name, seconds)
                fields = {**(call.fields or {}), **({"error": error} if error else {})}
                logs.event(log, "rpc", level=logging.ERROR if internal else logging.INFO, rpc=name,
                           model=call.model, version=call.version, code=code.name, seconds=round(seconds, 4),
                           **fields)

            try:
                if isinstance(request, Malformed):
                    raise InvalidInput(f"the request is not a valid {request.message_type}: {request.error}")
                if self.shutting_down():
                    raise ShuttingDown("the server is shutting down; retry on another instance")
                response = await handler(self, request, context, call)
                _check_size(response, self.settings.max_send_bytes, streamed)
                return response
            except asyncio.CancelledError:
                code = cancellation_code(context.time_remaining())
                raise
            except Exception as exc:
                code, message = to_status(exc, call.request_id)
                internal = code == grpc.StatusCode.INTERNAL
                refusal = getattr(exc, "refusal", "")
                error = str(exc) or type(exc).__name__
                if internal:  # the traceback goes to the log, never to the client
                    logs.event(log, "rpc_internal_error", level=logging.ERROR, exc_info=True, rpc=name)
                # Counted before the status leaves: a client that reads /metrics right after its error sees it.
                record()
                await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, call.request_id),))
                raise  # unreachable: abort raises
            finally:
                if not recorded:
                    record()
                logs.request_id.reset(token)

        return wrapper

    return decorate


def _check_size(response: Any, limit: int, streamed: bool) -> None:
    """Refuses an answer larger than the server sends in one message. gRPC refuses it as well, but after the
    handler, where the call has already been logged and counted as answered, and with an error line of its own."""
    # protobuf's C code sizes a message by encoding it: 1.5 µs for a sentence with its attention, as long as gRPC's own
    # encoding for a large answer (3 ms for 10 MB), which is rare and whose decoding took far longer.
    size = response.ByteSize() + (STREAM_ENVELOPE if streamed else 0)
    if size > limit:
        raise AnswerTooLarge(f"the answer is {size:,} bytes, more than this server sends in one message ({limit:,}, "
                             "max_send_bytes); send fewer texts per call or ask for less attention (attention "
                             "WORDS or NONE; in V2 leave out the ATTENTION output)")


class _Stages:
    """The end of a Caption call (or V2 inference) as the threads that prepare its images see it: they are not
    cancelled with the coroutine that waits for them, so they ask between their stages whether to go on."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline  # time.monotonic()
        self.ended = threading.Event()  # set when the waiting coroutine is cancelled

    def check(self, before: str) -> None:
        """Raises :class:`Cancelled` or :class:`DeadlineExceeded` if the call has ended, naming the stage not begun."""
        if self.ended.is_set():
            raise Cancelled(f"the call was cancelled before {before}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"the deadline passed before {before}")


class AttentionServicer(pb_grpc.AttentionServiceServicer):
    def __init__(self, models: Models, pool: Executor, settings: Settings, metrics: Metrics,
                 shutting_down: Callable[[], bool], inflight: CallsInFlight | None = None) -> None:
        self.models, self.pool, self.settings, self.metrics = models, pool, settings, metrics
        self.shutting_down = shutting_down
        # Translate/Caption calls between admission and answer, against settings.max_inflight (with front-end
        # processes, every front-end's: server/inflight.py)
        self.inflight = inflight if inflight is not None else CallsInFlight()
        self.unanswered = Unanswered()  # every call until its status is sent: what a drain waits for
        # Set when the server drains: an open V2 stream ends once its message in progress is answered, rather than
        # waiting for its client to close it (which would hold the drain for the whole grace period).
        self.streams_end = asyncio.Event()

    @rpc("Translate")
    async def Translate(self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext,
                        call: Call) -> pb.TranslateResponse:
        model = self.models.get_for("translation", request.model, request.version)
        call.model, call.version = model.name, model.version
        if not isinstance(model, TranslationModel):
            raise InvalidInput(f"model {model.name!r} is a {model.family} model; Translate needs a translation model")
        inline = self.inline_texts(request.texts)
        job = await self.offload(codec.translate_job, request, model, self.settings, inline=inline)
        call.fields = {"texts": len(job.sources), "beam_size": job.options.beam_size}

        async with self.admitted():
            found = await self.decode_translation(model, job, context.time_remaining())
            inline = inline and self.inline_answers(job)
            results, response = await self.offload(self._translated, model, job, found, inline=inline)
        source_tokens = sum(len(r.source.tokens) for r in results)
        target_tokens = sum(len(h.tokens) for r in results for h in r.hypotheses)
        self.metrics.count_tokens(model.name, model.version, source_tokens, target_tokens)
        self.metrics.attention_bytes.labels("Translate", model.name).observe(codec.attention_bytes(response))
        call.fields.update(source_tokens=source_tokens, target_tokens=target_tokens)
        return response

    @rpc("Caption")
    async def Caption(self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext,
                      call: Call) -> pb.CaptionResponse:
        model = self.models.get_for("captioning", request.model, request.version)
        call.model, call.version = model.name, model.version
        if not isinstance(model, CaptionModel):
            raise InvalidInput(f"model {model.name!r} is a {model.family} model; Caption needs a captioning model")
        job = codec.caption_job(request, model, self.settings)
        call.fields = {"image_bytes": len(job.image), "beam_size": job.options.beam_size}

        async with self.admitted():
            result = await self.run_caption(model, job, context.time_remaining())
            response = await self.offload(codec.caption_response, model, job, result)
        target_tokens = sum(len(h.tokens) for h in result.hypotheses)
        self.metrics.count_tokens(model.name, model.version, 0, target_tokens)
        self.metrics.images.labels(model.name, model.version).inc()
        self.metrics.attention_bytes.labels("Caption", model.name).observe(codec.attention_bytes(response))
        call.fields.update(width=result.width, height=result.height, target_tokens=target_tokens)
        return response

    # -- the inference path, shared with the V2 (Triton) protocol ----------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Counts a call against ``max_inflight`` (the whole server's bound on calls being handled)."""
        handled = self.inflight.total()
        if handled >= self.settings.max_inflight:
            raise TooManyCalls(f"{handled} calls are being handled, the server's limit (max_inflight); retry later")
        self.inflight.add(1)
        try:
            yield
        finally:
            self.inflight.add(-1)

    @staticmethod
    def inline_texts(texts: Sequence[str]) -> bool:
        """Whether a translation's texts are tokenized on the event loop (``INLINE_CHARS`` says why)."""
        return sum(len(text) for text in texts) <= INLINE_CHARS

    @staticmethod
    def inline_answers(job: codec.TranslateJob) -> bool:
        """Whether its hypotheses are detokenized and answered there too."""
        return len(job.sources) * job.options.nbest <= INLINE_HYPOTHESES

    async def offload(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """Runs CPU work (detokenizing, word alignments, building responses) on the worker pool, off the event
        loop and off the engines' threads; ``inline``: here, on the loop (``INLINE_CHARS`` says when)."""
        if inline:
            return fn(*args)
        context = contextvars.copy_context()  # the request id follows the work into the thread
        return await asyncio.get_running_loop().run_in_executor(self.pool, context.run, fn, *args)

    async def run_translate(self, model: TranslationModel, job: codec.TranslateJob,
                            timeout: float | None, inline: bool = False) -> list[Result]:
        """Decodes a validated job on the model's engine; raises the domain errors of :mod:`server.errors`
        (deadline, cancelled, overloaded). Cancelling the caller takes the job out of the batch."""
        found = await self.decode_translation(model, job, timeout)
        return await self.offload(model.finish, job.sources, found, job.options, inline=inline)

    async def decode_translation(self, model: TranslationModel, job: codec.TranslateJob,
                                 timeout: float | None) -> list[list[Hypothesis]]:
        """The job's token ids through the model's engine (here or in the engine process)."""
        return await self.models.decode(model, [s.ids for s in job.sources], job.options, timeout)

    @staticmethod
    def _translated(model: TranslationModel, job: codec.TranslateJob,
                    found: list[list[Hypothesis]]) -> tuple[list[Result], pb.TranslateResponse]:
        results = model.finish(job.sources, found, job.options)
        return results, codec.translate_response(model, job, results)

    async def run_caption(self, model: CaptionModel, job: codec.CaptionJob, timeout: float | None) -> CaptionResult:
        return (await self.run_captions(model, [job], timeout))[0]

    async def run_captions(self, model: CaptionModel, jobs: Sequence[codec.CaptionJob], timeout: float | None,
                           field: str | None = None) -> list[CaptionResult]:
        """Decodes the jobs' images on the worker pool, then captions them as one request to the model's engine (with
        the first job's options): one request in its queue, whose grid cells count together against
        max_queue_tokens, as a Translate request's texts do, so that a batch no queue could hold is refused at once
        (INVALID_ARGUMENT) rather than one of its images "retry later". ``field`` names a refused image with its
        index (the V2 protocol's ``IMAGE[i]``); by default it is attention.v1's one ``image``."""
        started = time.monotonic()
        stages = _Stages(None if timeout is None else started + timeout)

        async def pixels(index: int, job: codec.CaptionJob) -> tuple[tuple[int, int], np.ndarray]:
            try:
                return await self.offload(self._pixels, model, job, stages)
            except asyncio.CancelledError:  # the call ended (cancelled, deadline, another image refused)
                stages.ended.set()
                raise
            except FieldError as exc:
                if field is None:
                    raise
                raise exc.renamed(field, index) from exc

        if len(jobs) == 1:
            decoded = [await pixels(0, jobs[0])]
        else:
            tasks = [asyncio.ensure_future(pixels(i, job)) for i, job in enumerate(jobs)]
            try:
                decoded = await asyncio.gather(*tasks)
            except BaseException:  # the first refusal (or the call's end) stops the others' waits
                for task in tasks:
                    task.cancel()
                raise
        stages.check("the image was encoded")  # its pixels are not sent to an engine to be refused there
        if timeout is not None:
            timeout -= time.monotonic() - started
        found = await self.models.decode(model, [item for _, item in decoded], jobs[0].options, timeout)
        return await self.offload(model.finish, [size for size, _ in decoded], found)

    @staticmethod
    def _pixels(model: CaptionModel, job: codec.CaptionJob, stages: _Stages) -> tuple[tuple[int, int], np.ndarray]:
        """The image's (width, height) and the model's input: the decoded picture itself is dropped here, not held
        while the caption waits for and goes through the engine (a 40M-pixel picture is 120 MB).

        A call that ends meanwhile does not stop this thread, so it checks between the stages: before decoding (the
        job may have waited in the pool's queue past its deadline) and before the resize. A stage already running
        runs to its end: Pillow's decoders and resize cannot be interrupted. What bounds them is what ``decode``
        checks from the header before any pixel is decoded: max_image_bytes and max_image_pixels (and Pillow's own
        decompression-bomb guard behind it); at the default 40M pixels, a few tenths of a second each."""
        stages.check("the image was decoded")
        image = decode(job.image, job.limits)  # header and pixel limits before any pixel
        stages.check("the image was resized")
        return (image.width, image.height), model.pixels(image)

    @rpc("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext,
                         call: Call) -> pb.ListModelsResponse:
        ready = self.models.ready
        chosen = self._default_version() if ready else None
        return pb.ListModelsResponse(models=[
            codec.model_info(m.info(), ready, (m.name, m.version) == chosen) for m in self.models.models()
        ])

    def _default_version(self) -> tuple[str, str] | None:
        """The version a request naming no model gets (under the policy "all", its model's highest); none while the
        default model asked for (ATTN_DEFAULT_MODEL) has no version loaded, which a reload can leave: requests naming
        no model then get their family's first model."""
        try:
            default = self.models.get(self.models.default_model, "")
        except ModelNotFound:
            return None
        return default.name, default.version
