"""Regenerates the committed Python code of the ``.proto`` contract: ``python proto/generate.py [--check]``.

The generated modules live in the importable package ``attention/v1/`` at the repository root, mirroring the
proto package ``attention.v1``: ``*_pb2.py`` and ``*_pb2_grpc.py`` from grpcio-tools, ``*.pyi`` stubs from
mypy-protobuf. Triton's KServe V2 protocol (proto package ``inference``, vendored under
``proto/inference/``) goes to the package ``inference/`` the same way, with two edits (:func:`fix_inference`): its
files import each other by bare name, which becomes ``from inference import ...``, and its descriptors go to the pool
of ``inference/__init__.py`` instead of protobuf's default pool, so that a process may also import tritonclient's copy
of the same protocol. ``--check`` regenerates into a temporary folder and exits 1 if anything differs from what is
committed (a test runs it). The output depends on the tool versions, so they are pinned here and in pyproject.toml.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ["attention/v1/attention.proto"]
INFERENCE_PROTOS = ["grpc_service.proto", "model_config.proto"]  # compiled from proto/inference/, as upstream does
GENERATED = [
    "attention/v1/attention_pb2.py",
    "attention/v1/attention_pb2.pyi",
    "attention/v1/attention_pb2_grpc.py",
    "attention/v1/attention_pb2_grpc.pyi",
    *(f"inference/{name[:-len('.proto')]}{suffix}" for name in INFERENCE_PROTOS
      for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")),
]
_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.MULTILINE)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "from inference import POOL as _POOL\nDESCRIPTOR = _POOL.AddSerializedFile("
TOOLS = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}


def check_tools() -> list[str]:
    """Tool versions that differ from the pinned ones (their output would differ too)."""
    problems = []
    for name, wanted in TOOLS.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = "not installed"
        if found != wanted:
            problems.append(f"{name} {found} (the committed code was generated with {wanted})")
    return problems


def protoc(proto_path: Path, out: Path, protos: list[str]) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    bin_dir = Path(sys.executable).parent
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_path}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def fix_inference(folder: Path) -> None:
    """Package-qualified imports and the package's own descriptor pool in the generated ``inference`` modules."""
    for path in sorted(folder.glob("*_pb2*.py*")):
        text = _BARE_IMPORT.sub(r"from inference import \1 as ", path.read_text())
        path.write_text(text.replace(_DEFAULT_POOL, _PRIVATE_POOL))


def generate(out: Path) -> None:
    protoc(PROTO_ROOT, out, PROTOS)
    (out / "inference").mkdir(exist_ok=True)
    protoc(PROTO_ROOT / "inference", out / "inference", INFERENCE_PROTOS)
    fix_inference(out / "inference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    problems = check_tools()
    if problems:
        print("proto/generate.py: " + "; ".join(problems), file=sys.stderr)
        return 1
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in GENERATED
                 if not (ROOT / name).is_file() or not filecmp.cmp(Path(tmp) / name, ROOT / name, shallow=False)]
        extra = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
        extra = [name for name in extra if name not in GENERATED]
    if extra:
        print(f"proto/generate.py: unexpected generated files {extra}; update GENERATED", file=sys.stderr)
        return 1
    if stale:
        print(f"proto/generate.py: {stale} differ from the .proto; run `python proto/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
