"""The models a server answers with: found under ``<models_dir>/<name>/<version>/manifest.json``, validated,
loaded onto the chosen device and warmed up before the server reports ready.

A model family is served by the runtime class registered for it in :data:`RUNTIMES`; families without one are
skipped with a log line. A manifest that fails validation stops the
start-up with a message naming the file: serving a model set other than the one asked for is worse than not serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server import heap
from server.artifacts import Manifest, ManifestError, Tokenizer
from server.captioning import CaptionModel
from server.device import Device
from server.engine import Engine, Limits
from server.errors import NotReady, StartupError
from server.iobinding import join_rows
from server.logs import event
from server.metrics import Metrics
from server.models import ModelIndex, version_key
from server.runtime import DecoderRuntime
from server.search import Hypothesis
from server.translation import DecodeOptions, TranslationModel

log = logging.getLogger("attn.registry")

# A retired version's engine closes once it has been idle this long (requests that had just looked the version up
# still reach it), and at the latest after RETIRE_SECONDS.
RETIRE_IDLE_SECONDS = 2.0
RETIRE_SECONDS = 300.0


Runtime = DecoderRuntime


class RuntimeFactory(Protocol):
    def __call__(self, directory: Path, manifest: Manifest, device: Device | None, variant: str = "",
                 threads: int = 0, tokenizer: Tokenizer | None = None) -> Runtime:
        """``device`` None: the model without its graphs (a front-end's view)."""


RUNTIMES: dict[str, RuntimeFactory] = {"translation": TranslationModel, "captioning": CaptionModel}


def discover(models_dir: Path) -> list[Path]:
    """Every ``<name>/<version>`` folder holding a manifest; hidden folders (the exporter's staging) are skipped."""
    if not models_dir.is_dir():
        raise StartupError(f"models directory {models_dir} does not exist")
    found = []
    for name_dir in _folders(models_dir):
        for version_dir in _folders(name_dir):
            if (version_dir / "manifest.json").is_file():
                found.append(version_dir)
            else:
                event(log, "model_skipped", level=logging.WARNING, path=str(version_dir), reason="no manifest.json")
    return found


def _folders(directory: Path) -> list[Path]:
    """The visible folders in ``directory``, sorted; none if it was removed since its parent was listed (a model
    deleted while a reload looks)."""
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


class ModelLoadError(Exception):
    """A model version that cannot be served (invalid manifest, broken graph, failing warm-up)."""


class CountedRefusals:
    """The refused versions already counted in attn_model_load_failures_total, each with its files as they were seen
    (changed files refused again count again). In memory; or, for the engine processes of one server, also in a file
    of its private folder, which an engine restarted after a crash reads: the versions its predecessor refused and
    counted are not counted twice, and one it is the first to refuse (published while it was down) is counted."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._counted: set[tuple[Any, ...]] = set()
        if path is not None and path.exists():
            self._counted = {tuple(json.loads(line)) for line in path.read_text().splitlines() if line}

    def first(self, key: tuple[str, str], seen: tuple[float, ...]) -> bool:
        """Whether this refusal is to be counted: not counted before. Records it."""
        entry = (*key, *seen)
        if entry in self._counted:
            return False
        self._counted.add(entry)
        if self._path is not None:
            with self._path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        return True


def _no_change() -> dict[str, list[str]]:
    """A sync's report (what it loaded, refused and retired) before it did anything."""
    return {"loaded": [], "refused": [], "retired": []}


class LoadInterrupted(Exception):
    """The server began to stop while its models loaded (:meth:`Registry.interrupt`): the load ended early."""


def _signature(directory: Path) -> tuple[float, ...] | None:
    """Changes when the version's files change: a refused version is tried again only then. None if the folder was
    removed since it was found: the version is gone."""
    try:
        files = list(directory.iterdir())
    except FileNotFoundError:
        return None
    times = []
    for path in files:
        try:
            status = path.stat()
        except FileNotFoundError:
            continue  # removed since the listing
        if stat.S_ISREG(status.st_mode):
            times.append(status.st_mtime)
    return tuple(sorted(times))


def warm_serving_path(model: Runtime) -> None:
    """Makes what the serving path makes on first use and :meth:`~DecoderRuntime.warm_up` does not reach, while the
    model loads rather than on its first request: a beam and a greedy request through an engine of their own (no
    metrics) make the search's reductions on the step's provider and import what numpy imports lazily; with I/O
    binding, a join and a gather of every decoder input's rows on the device make their sessions (one per element
    type and rank), which a lane makes when rows join it while it decodes. A model that fails here fails to load
    instead of failing every request."""
    item = model.warm_up_item()
    engine = Engine(model)
    try:
        for future in [engine.submit([item], DecodeOptions(beam_size=4, nbest=2)),
                       engine.submit([item, item], DecodeOptions(beam_size=1))]:
            future.result()
    finally:
        engine.close()
    kernels = model.device_kernels
    if kernels is not None:
        state, static = model.encode([item])
        for value in [*state.values(), *static.values()]:
            join_rows(kernels.upload(value), value).take(np.zeros(1, dtype=np.int64), axis=0)


class Registry(ModelIndex):
    """The loaded model versions and their engines.

    Version policy: ``latest`` serves the highest version of each model that loads; ``all`` serves every version
    (requests naming none get the highest); a pin (``name=version``) serves exactly that version. :meth:`reload`
    brings the loaded set in line with the directory while requests go on: a new version is loaded and warmed
    beside the old one, then swapped in; a version that fails is refused, logged and counted, and what was serving
    keeps serving; a version that is no longer wanted stops getting requests and its engine is closed once idle. A
    served version is read once: its files changed in place are logged, not loaded.
    """

    def __init__(self, models_dir: Path, device: Device, default_model: str = "", variant: str = "",
                 threads: int = 0, limits: Limits | None = None, metrics: Metrics | None = None,
                 policy: str = "latest", pins: dict[str, str] | None = None) -> None:
        self.models_dir, self.device = Path(models_dir), device
        self.requested_default, self.variant, self.threads = default_model, variant, threads
        self.limits, self.metrics = limits or Limits(), metrics
        self.policy, self.pins = policy, pins or {}
        self.default_model = ""
        # Replaced whole, never mutated in place: readers on the event loop always see a consistent set.
        self._models: dict[tuple[str, str], Runtime] = {}
        self._engines: dict[tuple[str, str], Engine] = {}
        self._refused: dict[tuple[str, str], tuple[float, ...]] = {}
        self._served: dict[tuple[str, str], tuple[float, ...]] = {}  # a loaded version's files, as last seen
        self._draining: dict[tuple[str, str], Engine] = {}
        self._syncing = threading.Lock()
        self._ready = threading.Event()
        # Set when the server stops: a load or reload in progress loads no further version. A model set can take
        # minutes to load (large graphs, TensorRT's engines), and a SIGTERM must not wait for all of it.
        self._interrupted = threading.Event()
        self._published: set[tuple[str, ...]] = set()  # attn_model_info's label sets now at 1
        self._reload_failure = ""  # why the last reload failed, while reloads keep failing (reload_or_keep)
        # Whether a refused version counts in attn_model_load_failures_total. Several engine processes each load
        # every model from the same folder and refuse the same versions: only one of them counts (run_engine), and
        # only what it has not counted before (``counted``, which outlives the process when run_engine gives it a file).
        self.count_refusals = True
        self.counted = CountedRefusals()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self, strict: bool = True) -> None:
        """Loads and warms what the policy wants (blocking: run it off the event loop). Any model that fails stops
        the start-up with :class:`StartupError`: serving a model set other than the one asked for is worse. Not
        ``strict`` (an engine process restarted after a crash), such a version is refused and skipped as a reload
        does, and the start fails only when nothing loads. A pinned version missing from the folder stops a strict
        start too: the model would not be served at all (a mistyped pin), for all the pin says."""
        try:
            self._sync(strict=strict)
        except ModelLoadError as exc:
            raise StartupError(str(exc)) from exc
        if self._interrupted.is_set():
            raise LoadInterrupted("the server is stopping")
        if not self._models:
            raise StartupError(f"no servable model under {self.models_dir} ({self._why_nothing_loads()})")
        missing = self._missing_pins()
        if strict and missing:
            raise StartupError(f"the pinned versions {', '.join(missing)} (pinned_versions) are not in "
                               f"{self.models_dir}")
        names = sorted({name for name, _ in self._models})
        # Not strict, the default model may be gone (refused, or removed since a reload retired it, as here): the
        # engine comes back without it, as a reload goes on without it, rather than failing each restart.
        if strict and self.requested_default and self.requested_default not in names:
            raise StartupError(f"default model {self.requested_default!r} is not among the loaded models {names}")
        self._choose_default()
        self._ready.set()

    def _choose_default(self) -> None:
        """The model asked for, or else the first loaded one: again after a reload that removed every version of
        the one it was, as at the start."""
        names = sorted({name for name, _ in self._models})
        self.default_model = self.requested_default or names[0]

    def _why_nothing_loads(self) -> str:
        """The folder may hold models that pinned versions exclude: say so, not that it holds none."""
        missing = self._missing_pins()
        if discover(self.models_dir) and missing:
            return f"the pinned versions {', '.join(missing)} (pinned_versions) are not in it"
        return "expected <name>/<version>/manifest.json"

    def _missing_pins(self) -> list[str]:
        """The pins (``NAME=VERSION``) whose version the folder does not hold."""
        found = {(d.parent.name, d.name) for d in discover(self.models_dir)}
        return [f"{name}={version}" for name, version in sorted(self.pins.items()) if (name, version) not in found]

    def reload(self) -> dict[str, list[str]]:
        """Brings the loaded versions in line with the directory; returns what was loaded, refused and retired."""
        return self._sync(strict=False)

    def reload_or_keep(self) -> dict[str, list[str]]:
        """:meth:`reload` where a failure must not stop the server (SIGHUP, the watcher): when the folder cannot be
        read (removed, a volume unmounted, a disk error) what is loaded goes on serving. The failure is logged with
        its reason when it begins or changes, not at every look while it lasts (every 10 s by default, for as long as
        a volume stays away), and the first reload that works again says so. Anything else is a bug: logged with its
        traceback every time."""
        try:
            report = self.reload()
        except (StartupError, OSError) as exc:
            if str(exc) != self._reload_failure:
                self._reload_failure = str(exc)
                event(log, "reload_failed", level=logging.ERROR, error=str(exc))
            return _no_change()
        except Exception:
            event(log, "reload_failed", level=logging.ERROR, exc_info=True)
            return _no_change()
        if self._reload_failure:
            self._reload_failure = ""
            event(log, "reload_recovered", models=len(self._models))
        return report

    def _sync(self, strict: bool) -> dict[str, list[str]]:
        with self._syncing:
            found: dict[str, dict[str, Path]] = {}
            for directory in discover(self.models_dir):
                found.setdefault(directory.parent.name, {})[directory.name] = directory
            models, engines = dict(self._models), dict(self._engines)
            wanted: set[tuple[str, str]] = set()
            report = _no_change()
            for name, versions in sorted(found.items()):
                if name in self.pins:
                    candidates = [self.pins[name]] if self.pins[name] in versions else []
                    if not candidates:
                        event(log, "pinned_version_missing", level=logging.WARNING, model=name,
                              version=self.pins[name], found=sorted(versions, key=version_key))
                else:
                    candidates = sorted(versions, key=version_key, reverse=True)
                for version in candidates:
                    key = (name, version)
                    seen = _signature(versions[version])
                    if seen is None:
                        continue  # deleted since discover() found it: as if not found
                    if key in models and self._served.get(key) != seen:
                        # A version is read once (changing a model is publishing a new version, staged and renamed
                        # as the exporter does): a served one keeps what it loaded, and says so once per change.
                        self._served[key] = seen
                        event(log, "model_changed_in_place", level=logging.WARNING, model=name, version=version,
                              reason="a served version's files changed; it serves what it loaded until the server "
                                     "restarts: publish a new version to change the model")
                    if key not in models:
                        directory = versions[version]
                        if self._refused.get(key) == seen:
                            continue  # refused before and unchanged since
                        if self._interrupted.is_set():  # stopping: what this look loaded is never served
                            for new in engines.keys() - self._engines.keys():
                                engines[new].close()
                            return _no_change()
                        try:
                            model = self._load_one(directory)
                        except ModelLoadError as exc:
                            if strict:
                                raise
                            self._refuse(key, seen, exc)
                            report["refused"].append(f"{name}/{version}")
                            continue
                        if model is None:
                            continue
                        models[key], engines[key] = model, Engine(model, self.limits, self.metrics)
                        self._served[key] = seen
                        self._refused.pop(key, None)
                        report["loaded"].append(f"{name}/{version}")
                    wanted.add(key)
                    if self.policy == "latest" or name in self.pins:
                        break  # the highest version that loads
            retired = [key for key in models if key not in wanted]
            for key in retired:
                del models[key]
                report["retired"].append("/".join(key))
            if retired and not models:
                event(log, "reload_kept_models", level=logging.WARNING, reason="nothing would be left to serve")
                return {**report, "retired": []}
            self._models, old_engines = models, engines
            self._engines = {key: engines[key] for key in models}
            if self._ready.is_set():
                self._choose_default()
            for key in retired:
                self._served.pop(key, None)
                self._retire(key, old_engines[key])
            self._publish()
            if report["loaded"] or report["retired"]:
                heap.settle()  # what this process keeps changed: freeze it anew (server/heap.py)
            if report["loaded"] or report["retired"] or report["refused"]:
                event(log, "models_synced", loaded=report["loaded"], refused=report["refused"],
                      retired=report["retired"])
            return report

    def _load_one(self, directory: Path) -> Runtime | None:
        """Loads and warms one version; ``None`` for a family this server has no runtime for."""
        started = time.monotonic()
        try:
            manifest = Manifest.load(directory)
            if (manifest.name, manifest.version) != (directory.parent.name, directory.name):
                raise ManifestError(f"the manifest says {manifest.name}/{manifest.version}")
            factory = RUNTIMES.get(manifest.family)
            if factory is None:
                event(log, "model_skipped", level=logging.WARNING, path=str(directory),
                      reason=f"no runtime for family {manifest.family!r} yet")
                return None
            model = factory(directory, manifest, self.device, self.variant, self.threads)
            model.warm_up()
            warm_serving_path(model)
        except Exception as exc:  # a broken graph fails in ONNX Runtime's own exception types
            raise ModelLoadError(f"invalid model {directory}: {exc}") from exc
        if self.metrics:
            self.metrics.load_time.labels(model.name, model.version).set(time.monotonic() - started)
        event(log, "model_loaded", model=model.name, version=model.version, family=model.family,
              device=self.device.name, variant=model.variant, seconds=round(time.monotonic() - started, 3))
        return model

    def _refuse(self, key: tuple[str, str], seen: tuple[float, ...], error: Exception) -> None:
        """``seen``: the version's files as they were before the failed attempt, not after it: a copy that ended
        while the attempt failed on it changed them, and the finished version is tried again."""
        self._refused[key] = seen
        if self.metrics and self.count_refusals and self.counted.first(key, seen):
            self.metrics.load_failures.labels(key[0]).inc()
        event(log, "model_refused", level=logging.ERROR, model=key[0], version=key[1], error=str(error))

    def _retire(self, key: tuple[str, str], engine: Engine) -> None:
        """No new request gets this version; its engine closes once the requests it holds are done."""

        def drain() -> None:
            deadline = time.monotonic() + RETIRE_SECONDS
            idle_since = None
            while time.monotonic() < deadline:
                if engine.queued or engine.active:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > RETIRE_IDLE_SECONDS:
                    break
                time.sleep(0.05)
            engine.close()
            self._draining.pop(key, None)
            event(log, "model_unloaded", model=key[0], version=key[1])

        self._draining[key] = engine
        threading.Thread(target=drain, name=f"retire-{key[0]}-{key[1]}", daemon=True).start()

    def _publish(self) -> None:
        """``attn_model_info`` and ``attn_models_loaded`` for the loaded versions."""
        if not self.metrics:
            return
        published: set[tuple[str, ...]] = set()
        for (name, version), model in self._models.items():
            latest = max((v for n, v in self._models if n == name), key=version_key)
            labels: tuple[str, ...] = (name, version, model.family, self.device.name, model.variant,
                                       str(version == latest).lower())
            self.metrics.model_info.labels(*labels).set(1)
            published.add(labels)
        # With several server processes the values live on in this process's metrics file, which prometheus_client
        # cannot remove a series from (it warns, in lines of its own): there a retired version reads 0, and the
        # parent's /metrics leaves it out (server.metrics.LoadedVersionsOnly) with the version's gauges.
        removable = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        for labels in self._published - published:
            self.metrics.model_info.labels(*labels).set(0)
            if removable:
                self.metrics.model_info.remove(*labels)
        if removable:
            for name, version in {labels[:2] for labels in self._published} - set(self._models):
                self.metrics.forget_version(name, version)
        self._published = published
        self.metrics.models_loaded.set(len(self._models))

    def engine(self, model: Runtime) -> Engine:
        """The engine that decodes ``model``'s requests (a retired version's until it is closed)."""
        return self.engine_of(model.name, model.version)

    def engine_of(self, name: str, version: str) -> Engine:
        engine = self._engines.get((name, version)) or self._draining.get((name, version))
        if engine is None:
            raise NotReady(f"model {name} version {version} was just unloaded; retry")
        return engine

    async def decode(self, model: Runtime, items: Sequence[Any], options: Any,
                     timeout: float | None) -> list[list[Hypothesis]]:
        """Each item's hypotheses from the model's engine; cancelling the caller takes the request out of the
        batch. Raises the domain errors of :mod:`server.errors` (deadline, cancelled, overloaded)."""
        return await asyncio.wrap_future(self.engine(model).submit(items, options, timeout))

    def interrupt(self) -> None:
        """The server is stopping: a load or reload in progress loads no further version (it ends after the one it
        is loading). Only sets a flag: a signal handler may call it."""
        self._interrupted.set()

    def close(self) -> None:
        """Stops every engine: requests still queued or decoding fail with ShuttingDown."""
        self.interrupt()
        for engine in [*self._engines.values(), *self._draining.values()]:
            engine.close()
