"""The models a server answers with: found under ``<models_dir>/<name>/<version>/manifest.json``, validated,
loaded onto the chosen device and warmed up before the server reports ready.

A model family is served by the runtime class registered for it in :data:`RUNTIMES`; families without one are
skipped with a log line. A manifest that fails validation stops the
start-up with a message naming the file: serving a model set other than the one asked for is worse than not serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.artifacts import Manifest, ManifestError
from server.captioning import CaptionModel
from server.device import Device
from server.engine import Engine, Limits
from server.errors import ModelNotFound, NotReady, StartupError, echo
from server.logs import event
from server.metrics import Metrics
from server.runtime import DecoderRuntime
from server.translation import TranslationModel

log = logging.getLogger("attn.registry")

# A retired version's engine closes once it has been idle this long (requests that had just looked the version up
# still reach it), and at the latest after RETIRE_SECONDS.
RETIRE_IDLE_SECONDS = 2.0
RETIRE_SECONDS = 300.0


Runtime = DecoderRuntime
RuntimeFactory = Callable[[Path, Manifest, Device, str, int], Runtime]
RUNTIMES: dict[str, RuntimeFactory] = {"translation": TranslationModel, "captioning": CaptionModel}


def _version_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones: "10" is newer than "9"."""
    return (1, int(version)) if version.isdigit() else (0, version)


def discover(models_dir: Path) -> list[Path]:
    """Every ``<name>/<version>`` folder holding a manifest; hidden folders (the exporter's staging) are skipped."""
    if not models_dir.is_dir():
        raise StartupError(f"models directory {models_dir} does not exist")
    found = []
    for name_dir in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (version_dir / "manifest.json").is_file():
                found.append(version_dir)
            else:
                event(log, "model_skipped", level=logging.WARNING, path=str(version_dir), reason="no manifest.json")
    return found


class ModelLoadError(Exception):
    """A model version that cannot be served (invalid manifest, broken graph, failing warm-up)."""


def _signature(directory: Path) -> tuple[float, ...]:
    """Changes when the version's files change: a refused version is tried again only then."""
    return tuple(sorted(p.stat().st_mtime for p in directory.iterdir() if p.is_file()))


class Registry:
    """The loaded model versions and their engines.

    Version policy: ``latest`` serves the highest version of each model that loads; ``all`` serves every version
    (requests naming none get the highest); a pin (``name=version``) serves exactly that version. :meth:`reload`
    brings the loaded set in line with the directory while requests go on: a new version is loaded and warmed
    beside the old one, then swapped in; a version that fails is refused, logged and counted, and what was serving
    keeps serving; a version that is no longer wanted stops getting requests and its engine is closed once idle.
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
        self._draining: dict[tuple[str, str], Engine] = {}
        self._syncing = threading.Lock()
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Loads and warms what the policy wants (blocking: run it off the event loop). Any model that fails stops
        the start-up with :class:`StartupError`: serving a model set other than the one asked for is worse."""
        try:
            self._sync(strict=True)
        except ModelLoadError as exc:
            raise StartupError(str(exc)) from exc
        if not self._models:
            raise StartupError(f"no servable model under {self.models_dir} (expected <name>/<version>/manifest.json)")
        names = sorted({name for name, _ in self._models})
        if self.requested_default and self.requested_default not in names:
            raise StartupError(f"default model {self.requested_default!r} is not among the loaded models {names}")
        self.default_model = self.requested_default or names[0]
        self._ready.set()

    def reload(self) -> dict[str, list[str]]:
        """Brings the loaded versions in line with the directory; returns what was loaded, refused and retired."""
        return self._sync(strict=False)

    def _sync(self, strict: bool) -> dict[str, list[str]]:
        with self._syncing:
            found: dict[str, dict[str, Path]] = {}
            for directory in discover(self.models_dir):
                found.setdefault(directory.parent.name, {})[directory.name] = directory
            models, engines = dict(self._models), dict(self._engines)
            wanted: set[tuple[str, str]] = set()
            report: dict[str, list[str]] = {"loaded": [], "refused": [], "retired": []}
            for name, versions in sorted(found.items()):
                if name in self.pins:
                    candidates = [self.pins[name]] if self.pins[name] in versions else []
                    if not candidates:
                        event(log, "pinned_version_missing", level=logging.WARNING, model=name,
                              version=self.pins[name], found=sorted(versions, key=_version_key))
                else:
                    candidates = sorted(versions, key=_version_key, reverse=True)
                for version in candidates:
                    key = (name, version)
                    if key not in models:
                        directory = versions[version]
                        if self._refused.get(key) == _signature(directory):
                            continue  # refused before and unchanged since
                        try:
                            model = self._load_one(directory)
                        except ModelLoadError as exc:
                            if strict:
                                raise
                            self._refuse(key, directory, exc)
                            report["refused"].append(f"{name}/{version}")
                            continue
                        if model is None:
                            continue
                        models[key], engines[key] = model, Engine(model, self.limits, self.metrics)
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
            for key in retired:
                self._retire(key, old_engines[key])
            self._publish()
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
        except Exception as exc:  # a broken graph fails in ONNX Runtime's own exception types
            raise ModelLoadError(f"invalid model {directory}: {exc}") from exc
        if self.metrics:
            self.metrics.load_time.labels(model.name, model.version).set(time.monotonic() - started)
        event(log, "model_loaded", model=model.name, version=model.version, family=model.family,
              device=self.device.name, variant=model.variant, seconds=round(time.monotonic() - started, 3))
        return model

    def _refuse(self, key: tuple[str, str], directory: Path, error: Exception) -> None:
        self._refused[key] = _signature(directory)
        if self.metrics:
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
        self.metrics.model_info.clear()
        for (name, version), model in self._models.items():
            latest = max((v for n, v in self._models if n == name), key=_version_key)
            self.metrics.model_info.labels(name, version, model.family, self.device.name, model.variant,
                                           str(version == latest).lower()).set(1)
        self.metrics.models_loaded.set(len(self._models))

    def get(self, name: str = "", version: str = "") -> Runtime:
        """The model version a request names (empty name: the default; empty version: the highest)."""
        if not self.ready:
            raise NotReady("the server is still loading its models; retry shortly")
        name = name or self.default_model
        versions = sorted((v for n, v in self._models if n == name), key=_version_key)
        if not versions:
            raise ModelNotFound(f"model {echo(name)} is not loaded; loaded models: {', '.join(self.names())}")
        if not version:
            return self._models[(name, versions[-1])]
        if (name, version) not in self._models:
            raise ModelNotFound(f"model {echo(name)} has no version {echo(version)}; loaded versions: "
                                f"{', '.join(versions)}")
        return self._models[(name, version)]

    def default_for(self, family: str) -> str:
        """The model a request for ``family`` gets when it names none: the default model if it is of that family,
        else the first loaded model of the family by name; empty if none is loaded (``get`` then explains)."""
        families = {name: model.family for (name, _), model in self._models.items()}
        if families.get(self.default_model) == family:
            return self.default_model
        return next((name for name in sorted(families) if families[name] == family), "")

    def get_for(self, family: str, name: str = "", version: str = "") -> Runtime:
        """Like :meth:`get` for a request of ``family``: an empty name picks that family's default model."""
        if not name and self.ready:
            name = self.default_for(family)
            if not name:
                raise ModelNotFound(f"no {family} model is loaded; loaded models: {', '.join(self.names())}")
        return self.get(name, version)

    def engine(self, model: Runtime) -> Engine:
        """The engine that decodes ``model``'s requests (a retired version's until it is closed)."""
        key = (model.name, model.version)
        engine = self._engines.get(key) or self._draining.get(key)
        if engine is None:
            raise NotReady(f"model {model.name} version {model.version} was just unloaded; retry")
        return engine

    def close(self) -> None:
        """Stops every engine: requests still queued or decoding fail with ShuttingDown."""
        for engine in [*self._engines.values(), *self._draining.values()]:
            engine.close()

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._models})

    def models(self) -> list[Runtime]:
        return [self._models[key] for key in sorted(self._models, key=lambda k: (k[0], _version_key(k[1])))]
