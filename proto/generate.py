"""Regenerates the committed Python code of the ``.proto`` contract: ``python proto/generate.py [--check]``.

The generated modules of the proto package ``attention.v1`` live in the importable package ``attention_pb/v1/``
at the repository root (``_pb`` for generated protocol-buffer code, so that nobody looks there for attention
modules): ``*_pb2.py`` and ``*_pb2_grpc.py`` from grpcio-tools, ``*.pyi`` stubs from mypy-protobuf, with their
imports moved from ``attention.v1`` to ``attention_pb.v1`` (:func:`relocate`). Triton's KServe V2 protocol (proto
package ``inference``, vendored under ``proto/inference/``) goes to the package ``kserve_v2_pb/`` the same way, with
two edits (:func:`fix_kserve_v2`): its files import each other by bare name, which becomes ``from kserve_v2_pb import
...``, and its descriptors go to the pool of ``kserve_v2_pb/__init__.py`` instead of protobuf's default pool, so that
a process may also import tritonclient's copy of the same protocol. ``--check`` regenerates into a temporary folder
and exits 1 if anything differs from what is committed (a test runs it). The output depends on the tool versions,
so they are pinned here and in pyproject.toml.
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
ATTENTION_PACKAGE = "attention_pb"  # the Python package of the proto package ``attention.v1``
KSERVE_V2_PACKAGE = "kserve_v2_pb"  # ... and of Triton's ``inference``
GENERATED = [
    f"{ATTENTION_PACKAGE}/v1/attention_pb2.py",
    f"{ATTENTION_PACKAGE}/v1/attention_pb2.pyi",
    f"{ATTENTION_PACKAGE}/v1/attention_pb2_grpc.py",
    f"{ATTENTION_PACKAGE}/v1/attention_pb2_grpc.pyi",
    *(f"{KSERVE_V2_PACKAGE}/{name[:-len('.proto')]}{suffix}" for name in INFERENCE_PROTOS
      for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")),
]
_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.MULTILINE)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = f"from {KSERVE_V2_PACKAGE} import POOL as _POOL\nDESCRIPTOR = _POOL.AddSerializedFile("
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


def relocate(generated: Path, out: Path) -> None:
    """Moves protoc's ``attention/v1/`` output to ``attention_pb/v1/``, with the module paths in it."""
    target = out / ATTENTION_PACKAGE / "v1"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted((generated / "attention" / "v1").glob("*_pb2*.py*")):
        text = path.read_text().replace("from attention.v1 import", f"from {ATTENTION_PACKAGE}.v1 import")
        text = text.replace("'attention.v1.attention_pb2'", f"'{ATTENTION_PACKAGE}.v1.attention_pb2'")
        (target / path.name).write_text(text)


def fix_kserve_v2(folder: Path) -> None:
    """Package-qualified imports and the package's own descriptor pool in the generated V2 protocol modules."""
    for path in sorted(folder.glob("*_pb2*.py*")):
        text = _BARE_IMPORT.sub(rf"from {KSERVE_V2_PACKAGE} import \1 as ", path.read_text())
        path.write_text(text.replace(_DEFAULT_POOL, _PRIVATE_POOL))


def generate(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        protoc(PROTO_ROOT, Path(tmp), PROTOS)
        relocate(Path(tmp), out)
    (out / KSERVE_V2_PACKAGE).mkdir(exist_ok=True)
    protoc(PROTO_ROOT / "inference", out / KSERVE_V2_PACKAGE, INFERENCE_PROTOS)
    fix_kserve_v2(out / KSERVE_V2_PACKAGE)


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
