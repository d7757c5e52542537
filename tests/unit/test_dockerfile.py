"""deploy/Dockerfile builds a working server image: what its COPY lines take from the build context (after
.dockerignore) is enough to install the project and import the server and the client, without torch.

No Docker here: the COPY lines are replayed into a temporary directory, that directory is installed with pip into
another one, and a fresh interpreter imports from there alone — not from the repository, and not through the
editable install in the virtual environment (which maps every package back to the repository).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` for every instruction, continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def copies(text: str) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of every COPY from the build context (not ``--from``)."""
    result = []
    for keyword, rest in instructions(text):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        result.append((words[:-1], words[-1]))
    return result


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match with ``**``) as a regular expression over /-separated paths."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exception, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not exception
    return excluded


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        rules.append((exception, _pattern(line.lstrip("!").strip())))
    return rules


def context_files(root: Path, source: str, rules: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files under ``source`` (a file or a directory of ``root``) that Docker sends in the build context."""
    path = root / source
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [r for r in (p.relative_to(root).as_posix() for p in found) if not ignored(r, rules)]


def stage(root: Path, dockerfile_text: str, ignore_text: str, into: Path) -> None:
    """Replays the COPY lines into ``into`` (the image's WORKDIR); fails as ``docker build`` would on a source that
    is not in the build context."""
    rules = dockerignore_rules(ignore_text)
    for sources, destination in copies(dockerfile_text):
        target = into / destination
        for source in sources:
            source = source.strip("/")
            files = context_files(root, source, rules)
            assert files, f"COPY {source}: not in the build context (missing, or excluded by .dockerignore)"
            for name in files:
                if (root / source).is_file():
                    path = target / source if destination.endswith("/") or len(sources) > 1 else target
                else:
                    path = target / name[len(source) + 1:]
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, path)


def test_the_dockerignore_rules_as_docker_reads_them() -> None:
    rules = dockerignore_rules("*\n!server/\n**/__pycache__\n")
    assert ignored("training/cli.py", rules) and ignored("README.md", rules)
    assert not ignored("server/app.py", rules) and not ignored("server/artifacts/manifest.py", rules)
    assert ignored("server/__pycache__/app.cpython-311.pyc", rules)


def test_the_copy_lines_are_read_with_their_destinations() -> None:
    text = "FROM x\n# COPY not this\nCOPY --chown=1:1 a b ./\nCOPY server \\\n    ./server\nCOPY --from=build /x /y\n"
    assert copies(text) == [(["a", "b"], "./"), (["server"], "./server")]


@pytest.mark.timeout(300)
def test_the_image_contents_install_and_serve_without_the_repository(tmp_path: Path) -> None:
    src = tmp_path / "src"
    stage(ROOT, DOCKERFILE.read_text(), DOCKERIGNORE.read_text() if DOCKERIGNORE.exists() else "", src)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]

    # -S: no site-packages .pth files, so not the editable install's finder; the virtual environment's
    # site-packages comes back through PYTHONPATH, after the installed copy, for the third-party packages.
    # -P: neither the working directory nor the script's directory on sys.path.
    code = (
        "import sys, server, server.app, client.cli\n"
        f"assert server.__file__.startswith({str(target)!r}), server.__file__\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training', 'exporter')))\n"
        "sys.exit(f'the server imports {loaded}' if loaded else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"],
                                         sysconfig.get_paths()["platlib"]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-S", "-P", "-c", code], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_image_runs_as_the_numeric_user_and_group_the_kubernetes_pods_name() -> None:
    """runAsNonRoot can only verify a numeric USER, and a pod's runAsUser/runAsGroup should be the image's own ids
    (useradd alone gives the user's group a free system id, not the user's)."""
    import yaml

    steps = instructions(DOCKERFILE.read_text())
    (user,) = [rest for keyword, rest in steps if keyword == "USER"]
    run = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    group = re.search(r"groupadd [^&]*--gid (\d+) (\S+)", run)
    account = re.search(r"useradd [^&]*--uid (\d+) --gid (\S+) ", run)
    assert group and account, run
    uid, gid = account.group(1), group.group(1)
    assert account.group(2) == group.group(2)  # the user's primary group is the one made with that id
    assert user == f"{uid}:{gid}"
    for manifest in ("deployment.yaml", "batch-job.yaml"):
        pod = yaml.safe_load((ROOT / "deploy" / "k8s" / manifest).read_text())["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and (str(context["runAsUser"]), str(context["runAsGroup"])) == (uid, gid)


def _image_environment() -> dict[str, str]:
    """The ENV lines' ``NAME=value`` pairs."""
    found: dict[str, str] = {}
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                found[name] = value
    return found


@pytest.mark.timeout(120)
def test_onnx_runtime_has_a_writable_cache_in_the_image(tmp_path: Path) -> None:
    """Imported with a home it cannot write to (the image's, root's and read-only), ONNX Runtime writes a coloured
    warning that is no JSON log line; the image points its cache at /tmp, which deploy/k8s mounts writable."""
    import yaml

    cache = _image_environment()["XDG_CACHE_HOME"]
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    writable = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    assert any(Path(cache).is_relative_to(path) for path in writable), (cache, writable)

    def import_stderr(**env: str) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
        done = subprocess.run([sys.executable, "-c", "import onnxruntime"], capture_output=True, text=True,
                              timeout=100, cwd=tmp_path, env={**environ, "HOME": "/proc/self/fdinfo", **env})
        assert done.returncode == 0, done.stderr
        return done.stderr

    # No home to write to, even for root: why the setting is there. ONNX Runtime 1.27 (the lowest this project
    # allows) wrote no device id, so it printed nothing either way; 1.31 does.
    without = import_stderr()
    assert without == "" or "Failed to persist" in without, without
    assert import_stderr(XDG_CACHE_HOME=str(tmp_path / cache.lstrip("/"))) == ""
