"""Server settings: one dataclass, filled from command-line flags, then ``ATTN_*`` environment variables, then defaults.

Every field documents itself (``help``); ``attn-serve --help`` and the README's settings table are generated from
the same metadata, so they cannot drift apart (a test checks the README).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
VERSION_POLICIES = ("latest", "all")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_PORT = 65535
# What a Caption request holds beside its image (model, version, options, the field's tag and length), with room to
# spare: an image of max_image_bytes must fit in a request of max_receive_bytes, or gRPC refuses it before the server
# can say which limit it passed.
REQUEST_FIELDS_BYTES = 1024
VARIANTS = ("", "int8", "fp16")  # "": the fp32 graphs; the others as the exporter names them in the manifest


def _setting(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("0.0.0.0", "Address the gRPC and metrics servers listen on ('[::]' for IPv6 as well).")
    port: int = _setting(50051, "gRPC port; 0 picks a free port (logged in the 'listening' line).")
    metrics_port: int = _setting(9464, "Prometheus /metrics HTTP port; 0 picks a free port, -1 turns metrics off.")
    models_dir: str = _setting("models", "Folder holding the model directories NAME/VERSION/manifest.json.")
    default_model: str = _setting("", "Model used when a request names none; empty: the only (or first) model.")
    version_policy: str = _setting("latest", "Which versions of each model are served: latest (the highest that "
                                   "loads) or all (requests naming none get the highest).", VERSION_POLICIES)
    pinned_versions: str = _setting("", "Models held at one version whatever else the folder has, as "
                                    "NAME=VERSION,NAME=VERSION.")
    reload_interval: float = _setting(10.0, "Seconds between looks at the models folder for new or removed versions, "
                                      "and refused ones whose files changed (0: only on SIGHUP). A served version "
                                      "is read once: change a model by publishing a new version.")
    device: str = _setting("auto", "Where ONNX Runtime runs: cuda if usable (auto), or force cpu / cuda; tensorrt "
                           "puts TensorRT in front of CUDA (only when asked for: it builds engines per input-shape "
                           "range, so first requests of new shapes are slow).", DEVICES)
    variant: str = _setting("", "Graph variant from the manifest, for every model served: int8 (for CPUs) or fp16 "
                            "(for GPUs). A translation model whose export did not write it stops the start (a version "
                            "published later without it is refused); captioners ship fp32 graphs only and serve "
                            "those. Empty serves the fp32 graphs.", VARIANTS)
    ort_threads: int = _setting(0, "ONNX Runtime intra-op threads per session; 0: all cores but one (the other "
                                "serves gRPC and builds responses).")
    ort_allow_spinning: bool = _setting(False, "Let ONNX Runtime's idle worker threads spin-wait for work "
                                        "(session.intra_op.allow_spinning). Off: between decoder steps they sleep "
                                        "instead of keeping the cores that the gRPC event loop and the response "
                                        "threads need busy; on may shave latency on a machine with cores to spare.")
    frontends: int = _setting(-1, "gRPC front-end processes sharing the port (validation, tokenization, responses) "
                              "beside the engine processes that run the models (engines); -1: one per two cores, and "
                              "two on two or three cores (one on one); 0: everything in one process (tests, "
                              "debugging).")
    engines: int = _setting(1, "Engine processes beside the front-ends, each with every model loaded and a scheduler "
                            "of its own; a front-end sends each request to the ready one with the fewest of its "
                            "requests in flight. One engine process's Python is one core: more let a fast device "
                            "take more sentences per second, at the cost of a copy of the models (and of the CUDA "
                            "context) each and of smaller batches. With ort_threads 0 the engines share the cores "
                            "ONNX Runtime would get. Needs frontends other than 0.")
    workers: int = _setting(2, "Threads that decode images and turn hypotheses into responses while the models' "
                            "engines decode.")
    max_inflight: int = _setting(1024, "Translate/Caption calls handled at once by the whole server (queued, "
                                 "decoding or being answered); more get RESOURCE_EXHAUSTED.")
    batching: bool = _setting(True, "Iteration-level batching: decode the requests of all clients together; off "
                              "decodes one request at a time (for comparison).")
    max_batch_rows: int = _setting(256, "Most hypotheses (texts × beam) one model decodes together.")
    max_batch_tokens: int = _setting(32768, "Most source positions (tokens, or grid cells of images) over the "
                                     "hypotheses one model decodes together.")
    mixed_lane_rows: int = _setting(128, "While one model's engine decodes at most this many hypotheses, an RNN "
                                    "model's sources of up to 64 tokens share one decoder call per step; above it "
                                    "they decode in lanes by source length, one call each, so that short sources "
                                    "do not attend over long ones' padding. 0: always by length. On a GPU, where "
                                    "padding costs little and each call a launch, a value as large as "
                                    "max_batch_rows decodes all those sources in one call per step.")
    max_queue_requests: int = _setting(256, "Most requests waiting for one model; more get RESOURCE_EXHAUSTED.")
    max_queue_tokens: int = _setting(32768, "Most source tokens (grid cells for images) waiting for one model; more "
                                     "get RESOURCE_EXHAUSTED, and a request with more on its own INVALID_ARGUMENT.")
    max_texts: int = _setting(32, "Most texts in one Translate request.")
    max_text_chars: int = _setting(2000, "Most characters in one text.")
    default_beam_size: int = _setting(4, "Beam size when a request leaves it at 0 (1 = greedy).")
    max_beam_size: int = _setting(16, "Largest beam size a request may ask for.")
    max_image_bytes: int = _setting(10 * 2**20, "Largest encoded image a Caption request may send, in bytes; with "
                                    "its request it must fit in max_receive_bytes.")
    max_image_pixels: int = _setting(40_000_000, "Largest image (width × height, read from its header before "
                                     "decoding) a Caption request may send.")
    max_receive_bytes: int = _setting(16 * 2**20, "Largest request message accepted, in bytes.")
    max_send_bytes: int = _setting(256 * 2**20, "Largest response message sent, in bytes (attention matrices add up).")
    grace_seconds: float = _setting(30.0, "On SIGTERM/SIGINT: how long in-flight requests may take to finish.")
    max_connection_age: float = _setting(600.0, "Seconds after which a client connection is asked to move to a new "
                                         "one (gRPC GOAWAY; calls in flight get grace_seconds to finish), so that "
                                         "connections spread again over the front-ends and over replicas added "
                                         "since. 0: never. A client still reading a large answer when gRPC closes "
                                         "the old connection can lose it (UNAVAILABLE), less often if its channel "
                                         "sends as little as it can while it reads (the attn commands' channels "
                                         "turn off gRPC's bandwidth probe and fix the window: "
                                         "client.connection.QUIET_WHILE_READING); attn batch retries it "
                                         "(docs/serving-processes.md).")
    log_level: str = _setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", LOG_LEVELS)
    log_format: str = _setting("json", "Log lines as JSON objects (json) or key=value text (text). A process that "
                               "crashes (a fatal signal) writes its threads' stacks after them, as plain text.",
                               LOG_FORMATS)
    tls_cert: str = _setting("", "PEM certificate chain of the server; with tls_key the gRPC port speaks TLS only "
                             "(empty: plaintext). Renewed files serve new connections without a restart.")
    tls_key: str = _setting("", "PEM private key (unencrypted) of tls_cert; keep the file readable by the server only.")
    tls_client_ca: str = _setting("", "PEM CA certificate(s); when set, clients must present a certificate signed by "
                                  "one of them (mutual TLS). Needs tls_cert and tls_key.")
    auth_token_file: str = _setting("", "File of accepted bearer tokens, one per line ('#' starts a comment); "
                                    "empty: no token needed. Health and reflection stay open. Read again when it "
                                    "changes.")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                named = ", ".join(map(repr, choices))  # quoted: an empty choice ('') shows, not a blank
                raise ValueError(f"{f.name} must be one of {named}, not {getattr(self, f.name)!r}")
        for name in ("workers", "max_inflight", "max_batch_rows", "max_batch_tokens", "max_queue_requests",
                     "max_queue_tokens", "max_texts", "max_text_chars", "default_beam_size", "max_beam_size",
                     "max_receive_bytes", "max_send_bytes", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_image_bytes + REQUEST_FIELDS_BYTES > self.max_receive_bytes:
            raise ValueError(f"max_image_bytes {self.max_image_bytes} does not fit in a request of max_receive_bytes "
                             f"{self.max_receive_bytes} (with {REQUEST_FIELDS_BYTES} bytes for its other fields): "
                             "raise max_receive_bytes too")
        if self.default_beam_size > self.max_beam_size:
            raise ValueError(f"default_beam_size {self.default_beam_size} exceeds max_beam_size {self.max_beam_size}")
        if self.frontends < -1:
            raise ValueError(f"frontends must be -1 (from the core count), 0 or more, not {self.frontends}")
        if self.engines < 1:
            raise ValueError(f"engines must be at least 1, not {self.engines}")
        if self.engines > 1 and self.frontends == 0:
            raise ValueError(f"engines {self.engines} needs front-end processes: with frontends 0 the models run in "
                             "the one process")
        for f in fields(self):  # nan compares false with everything, and slips past every check below
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, not {getattr(self, f.name)}")
        for name in ("port", "ort_threads", "grace_seconds", "reload_interval", "max_connection_age",
                     "mixed_lane_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.port > MAX_PORT:
            raise ValueError(f"port must be at most {MAX_PORT}, not {self.port}")
        if not -1 <= self.metrics_port <= MAX_PORT:
            raise ValueError(f"metrics_port must be -1 (off) or 0 to {MAX_PORT}, not {self.metrics_port}")
        parse_pins(self.pinned_versions)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @staticmethod
    def env_name(name: str) -> str:
        return "ATTN_" + name.upper()

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags win over environment variables, which win over the defaults."""
        parser = cls.parser()
        args = parser.parse_args(argv)
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag_value = getattr(args, f.name)
            if flag_value is not None:
                values[f.name] = flag_value
            elif cls.env_name(f.name) in environ:
                raw = environ[cls.env_name(f.name)]
                try:
                    values[f.name] = _convert(f.default, raw)
                except ValueError:
                    parser.error(f"{cls.env_name(f.name)}={raw!r} is not a valid {type(f.default).__name__}")
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="attn-serve", description="Serve exported attention models over gRPC.",
            epilog="Every flag can also be set by the environment variable shown in brackets.",
        )
        for f in fields(cls):
            assert f.default is not MISSING
            # default None: a flag left out lets the environment variable, then the field's default, decide
            help = f"{f.metadata['help']} [{cls.env_name(f.name)}, default {f.default!r}]".replace("%", "%%")
            if isinstance(f.default, bool):
                parser.add_argument(cls.flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help)
            else:
                parser.add_argument(cls.flag(f.name), type=type(f.default), default=None,
                                    choices=f.metadata["choices"], help=help)
        return parser

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def table(cls) -> list[tuple[str, str, str, str]]:
        """(environment variable, flag, default, meaning) for every setting: the README's table."""
        return [(cls.env_name(f.name),
                 f"{cls.flag(f.name)}/--no-{cls.flag(f.name)[2:]}" if isinstance(f.default, bool) else cls.flag(f.name),
                 str(f.default) if f.default != "" else '""', f.metadata["help"]) for f in fields(cls)]


def parse_pins(spec: str) -> dict[str, str]:
    """``"de-en=3,captions=1"`` → ``{"de-en": "3", "captions": "1"}``."""
    pins = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, version = part.partition("=")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"pinned version {part!r} is not NAME=VERSION")
        pins[name.strip()] = version.strip()
    return pins


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{raw!r} is not true/false")
    return value in ("1", "true", "yes", "on")


def _convert(default: Any, raw: str) -> Any:
    return _parse_bool(raw) if isinstance(default, bool) else type(default)(raw)
