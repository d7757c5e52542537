"""Hostile calls against the real server: whatever a client sends, the server answers with a code that says what
was wrong, stays up, logs no error, and drains cleanly.

    .venv/bin/python bench/hostile.py                         # the bundled models, the default processes, 60 s
    .venv/bin/python bench/hostile.py --frontends 0 --seconds 30
    .venv/bin/python bench/hostile.py --frontends 2 --engines 2

``--clients`` threads send, each one call after another, for ``--seconds``: Translate with texts of odd content and
length (empty, 100,000 characters, control and right-to-left characters, emoji, reserved pieces) and options in and
out of range; Caption with random bytes, images whose headers claim 2³¹ pixels, real images of odd sizes and
formats; V2 ``ModelInfer`` and ``ModelStreamInfer`` with wrong names, shapes, datatypes, truncated BYTES tensors and
parameters of the wrong type; random bytes sent to each method as its request; unknown methods; metadata calls for
models that do not exist. Deadlines range from 1 ms to 30 s, and some calls are cancelled by the client after 0 to
50 ms. Most calls name real models with sane options, so that the engines decode while the rest arrives.

The check fails (exit status 1) when a call ends with a code that means a fault of the server (INTERNAL, UNKNOWN,
DATA_LOSS, UNAVAILABLE: nothing here shuts it down), when the server logs a line at error level or above, when
one of its processes is gone at the end, when a plain call fails afterwards, or when it does not exit 0 on SIGTERM.
Results: docs/benchmarks/hostile.json (the codes by kind of call) and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from PIL import Image  # noqa: E402

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from attention_pb.v1 import attention_pb2_grpc as pb_grpc  # noqa: E402
from bench.arguments import non_negative_int, positive_float, positive_int, writable_file  # noqa: E402
from bench.loadgen import ServerProcess, commit_of, save_results  # noqa: E402
from bench.overhead import design_name  # noqa: E402
from bench.sections import command_line, replace_section, shown  # noqa: E402
from kserve_v2_pb import grpc_service_pb2 as v2  # noqa: E402
from kserve_v2_pb import grpc_service_pb2_grpc as v2_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- hostile: written by bench/hostile.py -->", "<!-- /hostile -->"
SERVER_FAULTS = ("INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE")
WORDS = ("Ein", "Mann", "fährt", "Fahrrad", ".", "Hallo", "Welt", "🙂", "\u202e", "\x00", "a" * 300, "ß", "<s>",
         "</s>", "<unk>", " ", "\t\n", "中文", "é" * 50)
METHODS = ("/attention.v1.AttentionService/Translate", "/attention.v1.AttentionService/Caption",
           "/attention.v1.AttentionService/ListModels", "/inference.GRPCInferenceService/ModelInfer",
           "/inference.GRPCInferenceService/ModelMetadata", "/inference.GRPCInferenceService/ModelConfig",
           "/attention.v1.AttentionService/Nothing", "/no.Such/Method")
BAD_NAMES = ("nope", "../etc/passwd", "de-en-bahdanau\x00", "m" * 5000, " ")
BAD_VERSIONS = ("0", "-1", "999999999999999999999", "latest", "abc", "9" * 3000)


class Caller:
    """One client thread's calls; ``models`` are the server's, by family."""

    def __init__(self, target: str, models: dict[str, list[str]], seed: int) -> None:
        self.r = random.Random(seed)
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self.stub, self.v2 = pb_grpc.AttentionServiceStub(self.channel), v2_grpc.GRPCInferenceServiceStub(self.channel)
        self.models = models
        self.kinds: dict[str, Callable[[float | None], None]] = {
            "translate": self.translate, "translate cancelled": self.translate_cancelled, "caption": self.caption,
            "v2 infer": self.infer, "v2 stream": self.stream, "raw bytes": self.raw, "metadata": self.metadata}
        self.weights = (40, 6, 14, 16, 5, 12, 7)

    def one(self) -> tuple[str, str]:
        kind = self.r.choices(list(self.kinds), self.weights)[0]
        deadline = self.r.choice((None, 30.0, 30.0, 5.0, 0.5, 0.05, 0.001))
        try:
            self.kinds[kind](deadline)
            return kind, "OK"
        except grpc.FutureCancelledError:
            return kind, "CANCELLED by the client"
        except grpc.RpcError as error:
            return kind, error.code().name

    # -- what a call names and asks for ---------------------------------------------------------------------------

    def name(self, family: str) -> tuple[str, str]:
        if self.r.random() < 0.2:
            return self.r.choice((*BAD_NAMES, *self.models.get("translation", ()))), self.r.choice(BAD_VERSIONS)
        return self.r.choice((*self.models.get(family, ["nope"]), "")), ""

    def text(self) -> str:
        if self.r.random() < 0.6:
            return " ".join(self.r.choice(WORDS[:7]) for _ in range(self.r.choice((1, 5, 20, 60))))
        words = " ".join(self.r.choice(WORDS) for _ in range(self.r.choice((0, 1, 3, 10, 40, 200, 2000))))
        return words[: self.r.choice((10, 100, 2000, 5000, 100_000))]

    def options(self) -> pb.DecodingOptions:
        r = self.r
        if r.random() < 0.75:
            options = pb.DecodingOptions(beam_size=r.choice((0, 1, 4, 16)), max_output_tokens=r.choice((0, 5, 200)))
            options.attention = r.choice((0, 1, 2, 3))  # type: ignore[assignment]
            options.nbest = r.choice((0, 1, max(1, options.beam_size)))
            return options
        options = pb.DecodingOptions(beam_size=r.choice((0, 17, 1000, 2**32 - 1)), nbest=r.choice((0, 5, 2**32 - 1)),
                                     max_output_tokens=r.choice((0, 1, 10**6, 2**32 - 1)))
        options.attention = r.choice((0, 1, 2, 3, 7))  # type: ignore[assignment]  # 7: no such value
        if r.random() < 0.5:
            options.length_penalty = r.choice((0.0, -1.0, float("nan"), float("inf"), 1e30))
        if r.random() < 0.3:
            options.attention_layer = r.choice((0, 1, 5, 2**32 - 1))
        if r.random() < 0.3:
            options.attention_head = r.choice((-2, -1, 0, 3, 100, 2**31 - 1))
        return options

    def image(self) -> bytes:
        r, kind = self.r, self.r.random()
        if kind < 0.25:
            return r.randbytes(r.choice((0, 1, 10, 1000, 100_000)))
        if kind < 0.4:
            return b"\x89PNG\r\n\x1a\n" + r.randbytes(r.choice((10, 100, 5000)))
        if kind < 0.55:  # a valid PNG header that claims up to 2³¹ × 2³¹ pixels, and then noise
            header = b"IHDR" + struct.pack(">IIBBBBB", r.choice((1, 100_000, 2**31 - 1)),
                                           r.choice((1, 100_000, 2**31 - 1)), 8, 2, 0, 0, 0)
            return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header))
                    + r.randbytes(50))
        buffer, fmt = io.BytesIO(), r.choice(("PNG", "JPEG", "GIF", "BMP"))
        mode = r.choice(("RGB", "L", "RGBA") if fmt == "PNG" else ("RGB", "L"))
        Image.new(mode, (r.choice((1, 7, 224, 1000)), r.choice((1, 5, 224, 800)))).save(buffer, format=fmt)
        return buffer.getvalue()

    def infer_request(self) -> v2.ModelInferRequest:
        r = self.r
        if r.random() < 0.5 and "translation" in self.models:  # a sane one
            request = v2.ModelInferRequest(model_name=r.choice(self.models["translation"]), id=str(r.getrandbits(32)))
            texts = [self.text().encode() for _ in range(r.choice((1, 2, 8)))]
            tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts), 1])
            tensor.contents.bytes_contents.extend(texts)
            for name in r.sample(("TRANSLATION", "ATTENTION", "TOKENS"), r.choice((0, 1, 3))):
                request.outputs.add(name=name)
            return request
        family = r.choice(("translation", "captioning"))
        name, version = self.name(family)
        request = v2.ModelInferRequest(model_name=name, model_version=version, id=str(r.getrandbits(32)))
        for _ in range(r.choice((0, 1, 1, 1, 2))):
            tensor = request.inputs.add(name=r.choice(("TEXT", "TEXT", "IMAGE", "X", "")),
                                        datatype=r.choice(("BYTES", "BYTES", "FP32", "INT32", "??")))
            count = r.choice((1, 2, 3))
            tensor.shape.extend(r.choice(([count], [count, 1], [], [-1], [3, 0], [2**40])))
            values = [self.image() if tensor.name == "IMAGE" else self.text().encode()[:500] for _ in range(count)]
            if r.random() < 0.6:
                raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
                request.raw_input_contents.append(r.choice((raw, raw[:-1], struct.pack("<I", 2**31) + b"abc")))
            else:
                tensor.contents.bytes_contents.extend(values)
        for _ in range(r.choice((0, 0, 1, 2))):
            request.outputs.add(name=r.choice(("TRANSLATION", "ATTENTION", "TOKENS", "CAPTION", "NOPE")))
        if r.random() < 0.4:
            parameter = request.parameters[r.choice(("beam_size", "max_output_tokens", "timeout", "priority",
                                                     "length_penalty", "attention_layer", "bogus"))]
            setattr(parameter, *r.choice((("int64_param", r.choice((-1, 0, 4, 2**62))),
                                          ("double_param", r.choice((float("nan"), -1.0, 1e300))),
                                          ("string_param", "x"), ("bool_param", True))))
        return request

    # -- the calls ------------------------------------------------------------------------------------------------

    def translate_request(self) -> pb.TranslateRequest:
        name, version = self.name("translation")
        return pb.TranslateRequest(model=name, version=version, options=self.options(),
                                   texts=[self.text() for _ in range(self.r.choice((0, 1, 1, 2, 16, 33, 300)))])

    def translate(self, deadline: float | None) -> None:
        self.stub.Translate(self.translate_request(), timeout=deadline)

    def translate_cancelled(self, deadline: float | None) -> None:
        future = self.stub.Translate.future(self.translate_request(), timeout=deadline)
        time.sleep(self.r.choice((0.0, 0.001, 0.01, 0.05)))
        future.cancel()
        future.result()

    def caption(self, deadline: float | None) -> None:
        name, version = self.name("captioning")
        self.stub.Caption(pb.CaptionRequest(model=name, version=version, image=self.image(), options=self.options()),
                          timeout=deadline)

    def infer(self, deadline: float | None) -> None:
        self.v2.ModelInfer(self.infer_request(), timeout=deadline)

    def stream(self, deadline: float | None) -> None:
        requests = [self.infer_request() for _ in range(self.r.choice((1, 3, 10)))]
        for _ in self.v2.ModelStreamInfer(iter(requests), timeout=deadline):
            pass

    def raw(self, deadline: float | None) -> None:
        call: Any = self.channel.unary_unary(self.r.choice(METHODS))  # no serializers: the bytes go as they are
        call(self.r.randbytes(self.r.choice((0, 1, 5, 100, 10_000))), timeout=deadline)

    def metadata(self, deadline: float | None) -> None:
        name, version = self.name(self.r.choice(("translation", "captioning")))
        self.v2.ModelMetadata(v2.ModelMetadataRequest(name=name, version=version), timeout=deadline)
        self.v2.ModelConfig(v2.ModelConfigRequest(name=name, version=version), timeout=deadline)
        self.v2.ModelReady(v2.ModelReadyRequest(name=name, version=version), timeout=deadline)
        self.stub.ListModels(pb.ListModelsRequest(), timeout=deadline)


def run(models_dir: Path, seconds: float, clients: int, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """Starts the server with ``settings`` (``ATTN_*`` names without the prefix), sends hostile calls, stops it;
    returns what happened, with ``faults`` listing every reason the check fails (empty when it passes)."""
    codes: Counter[tuple[str, str]] = Counter()
    stopped: list[str] = []  # clients that ended before their time on an error of their own
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "server.log"
        server = ServerProcess(models_dir, log_path=log_path, **settings)
        try:
            processes_before = server.processes()
            channel = grpc.insecure_channel(server.target)
            listed = pb_grpc.AttentionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
            models: dict[str, list[str]] = {}
            for model in listed.models:
                models.setdefault(model.family, []).append(model.name)

            def client(number: int) -> None:
                caller, end = Caller(server.target, models, seed * 1000 + number), time.monotonic() + seconds
                try:
                    while time.monotonic() < end:
                        outcome = caller.one()
                        with lock:
                            codes[outcome] += 1
                except Exception as error:  # this script's fault, not the server's: a check without its calls fails
                    with lock:
                        stopped.append(f"client {number} stopped early: {error!r}")
                finally:
                    caller.channel.close()

            threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            gone = sorted(set(processes_before.values()) - set(server.processes().values()))
            plain_call = "OK"
            if "translation" in models:
                try:
                    answer = pb_grpc.AttentionServiceStub(channel).Translate(
                        pb.TranslateRequest(model=models["translation"][0], texts=["Ein Mann fährt Fahrrad ."]),
                        timeout=30)
                    assert answer.translations[0].hypotheses[0].text
                except (grpc.RpcError, AssertionError) as error:
                    plain_call = f"failed: {error}"
            channel.close()
        finally:
            server.close()
        exit_code = server.process.returncode
        time.sleep(0.5)  # the log's drain thread writes the last lines
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("level") in ("error", "critical")]
    faults = [f"{count} {kind} calls ended {code}" for (kind, code), count in sorted(codes.items())
              if code in SERVER_FAULTS]
    faults += [f"the server logged at error level: {line.get('event')}" for line in errors[:10]]
    faults += [f"process {name} was gone at the end" for name in gone]
    faults += stopped
    faults += [f"a plain Translate afterwards {plain_call}"] if plain_call != "OK" else []
    faults += [f"the server exited {exit_code} on SIGTERM"] if exit_code != 0 else []
    return {"seconds": seconds, "clients": clients, "settings": settings, "models": models,
            "calls": sum(codes.values()), "codes": {f"{kind}: {code}": n for (kind, code), n in sorted(codes.items())},
            "log_levels": dict(Counter(line.get("level", "?") for line in lines)),
            "undelivered_statuses": sum(line.get("event") == "rpc_status_undelivered" for line in lines),
            "exit_code": exit_code, "faults": faults}


def report(results: list[dict[str, Any]], commit: str, command: str = ".venv/bin/python bench/hostile.py",
           results_file: str = "docs/benchmarks/hostile.json") -> list[str]:
    lines = [BEGIN, "## Hostile calls", "",
             f"Produced by `{command}` at commit {commit}; raw numbers in `{results_file}`. What is sent and what "
             "fails the check: the script's docstring.", "",
             "| design | calls | codes | server log lines by level | statuses sent after the call ended | faults |",
             "|---|---|---|---|---|---|"]
    for result in results:
        totals: Counter[str] = Counter()
        for key, count in result["codes"].items():
            totals[key.split(": ", 1)[1]] += count
        codes = ", ".join(f"{code} {count:,}" for code, count in totals.most_common())
        levels = ", ".join(f"{level} {count:,}" for level, count in sorted(result["log_levels"].items()))
        lines.append(f"| {design(result['settings'])} | {result['calls']:,} | {codes} | {levels} | "
                     f"{result['undelivered_statuses']} | {'; '.join(result['faults']) or 'none'} |")
    lines += ["", END]
    return lines


def design(settings: dict[str, Any]) -> str:
    """The design's name as bench/overhead.py's tables write it."""
    frontends, engines = settings["frontends"], settings.get("engines", 1)
    return design_name(str(frontends) if engines == 1 or not frontends else f"{frontends}x{engines}", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=positive_float, default=60.0)
    parser.add_argument("--clients", type=positive_int, default=24)
    parser.add_argument("--frontends", type=non_negative_int, nargs="*", default=[2, 0],
                        help="a run per value (0: one process); default 2 and 0")
    parser.add_argument("--engines", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=writable_file, default=ROOT / "docs" / "benchmarks" / "hostile.json")
    parser.add_argument("--report", type=writable_file, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    results = []
    for frontends in args.frontends:
        settings = {"frontends": frontends, **({"engines": args.engines} if frontends and args.engines != 1 else {})}
        result = run(args.models_dir, args.seconds, args.clients, args.seed, **settings)
        print(f"{design(settings)}: {result['calls']:,} calls, log levels {result['log_levels']}, "
              f"faults: {result['faults'] or 'none'}")
        for key, count in result["codes"].items():
            print(f"  {key}: {count:,}")
        results.append(result)
    commit = commit_of()
    command = command_line("hostile.py", argv)
    save_results(args.json, {"commit": commit, "command": command, "runs": results})
    replace_section(args.report, BEGIN, END, report(results, commit, command, shown(args.json)))
    return 1 if any(result["faults"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
