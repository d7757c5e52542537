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
from server.errors import ModelNotFound, NotReady, StartupError
from server.logs import event
from server.metrics import Metrics
from server.runtime import DecoderRuntime
from server.translation import TranslationModel

log = logging.getLogger("attn.registry")


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


class Registry:
    def __init__(self, models_dir: Path, device: Device, default_model: str = "", variant: str = "",
                 threads: int = 0, limits: Limits | None = None, metrics: Metrics | None = None) -> None:
        self.models_dir, self.device = Path(models_dir), device
        self.requested_default, self.variant, self.threads = default_model, variant, threads
        self.limits, self.metrics = limits or Limits(), metrics
        self.default_model = ""
        self._models: dict[tuple[str, str], Runtime] = {}
        self._engines: dict[tuple[str, str], Engine] = {}
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Loads and warms every model (blocking: run it off the event loop). Raises :class:`StartupError`."""
        for directory in discover(self.models_dir):
            try:
                manifest = Manifest.load(directory)
            except ManifestError as exc:
                raise StartupError(f"invalid model {directory}: {exc}") from exc
            if (manifest.name, manifest.version) != (directory.parent.name, directory.name):
                raise StartupError(f"{directory}: the manifest says {manifest.name}/{manifest.version}")
            started = time.monotonic()
            factory = RUNTIMES.get(manifest.family)
            if factory is None:
                event(log, "model_skipped", level=logging.WARNING, path=str(directory),
                      reason=f"no runtime for family {manifest.family!r} yet")
                continue
            try:
                model = factory(directory, manifest, self.device, self.variant, self.threads)
            except ManifestError as exc:
                raise StartupError(f"invalid model {directory}: {exc}") from exc
            model.warm_up()
            self._models[(model.name, model.version)] = model
            self._engines[(model.name, model.version)] = Engine(model, self.limits, self.metrics)
            if self.metrics:
                self.metrics.load_time.labels(model.name, model.version).set(time.monotonic() - started)
            event(log, "model_loaded", model=model.name, version=model.version, family=model.family,
                  device=self.device.name, variant=self.variant or "fp32")
        if not self._models:
            raise StartupError(f"no servable model under {self.models_dir} (expected <name>/<version>/manifest.json)")
        names = sorted({name for name, _ in self._models})
        if self.requested_default and self.requested_default not in names:
            raise StartupError(f"default model {self.requested_default!r} is not among the loaded models {names}")
        self.default_model = self.requested_default or names[0]
        self._publish()
        self._ready.set()

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
            raise ModelNotFound(f"model {name!r} is not loaded; loaded models: {', '.join(self.names())}")
        if not version:
            return self._models[(name, versions[-1])]
        if (name, version) not in self._models:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; loaded versions: {', '.join(versions)}")
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
        """The engine that decodes ``model``'s requests."""
        return self._engines[(model.name, model.version)]

    def close(self) -> None:
        """Stops every engine: requests still queued or decoding fail with ShuttingDown."""
        for engine in self._engines.values():
            engine.close()

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._models})

    def models(self) -> list[Runtime]:
        return [self._models[key] for key in sorted(self._models, key=lambda k: (k[0], _version_key(k[1])))]
