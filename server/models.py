"""What the servicers need of the models, wherever they run: :class:`server.registry.Registry` holds them in this
process (``ATTN_FRONTENDS=0``); :class:`server.ipc.frontend.RemoteModels` reaches them in the engine process.
Both look models up the same way (:class:`ModelIndex`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from server.errors import ModelNotFound, NotReady, echo
from server.runtime import DecoderRuntime
from server.search import Hypothesis


def version_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones: "10" is newer than "9"."""
    return (1, int(version)) if version.isdigit() else (0, version)


class Models(Protocol):
    @property
    def ready(self) -> bool:
        """Every model is loaded and warm: requests may come."""

    @property
    def default_model(self) -> str: ...

    def models(self) -> list[DecoderRuntime]:
        """The served versions, by name then version."""

    def get(self, name: str = "", version: str = "") -> DecoderRuntime:
        """The version a request names; raises :class:`NotReady` or :class:`ModelNotFound`."""

    def get_for(self, family: str, name: str = "", version: str = "") -> DecoderRuntime:
        """Like :meth:`get` for a request of ``family``: an empty name picks that family's default model."""

    async def decode(self, model: DecoderRuntime, items: Sequence[Any], options: Any,
                     timeout: float | None) -> list[list[Hypothesis]]:
        """Each item's hypotheses (best first); ``items`` are what the model's engine decodes (token ids, an
        image's pixels). Cancelling the caller takes the request out of the batch."""


class ModelIndex:
    """Lookups over ``_models`` ((name, version) → model, replaced whole, never mutated in place, so readers on the
    event loop always see a consistent set) for a subclass that says when it is :attr:`ready`."""

    default_model: str
    _models: dict[tuple[str, str], DecoderRuntime]
    not_ready = "the server is still loading its models; retry shortly"  # what a call hears while not ready

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def get(self, name: str = "", version: str = "") -> DecoderRuntime:
        """The model version a request names (empty name: the default; empty version: the highest)."""
        if not self.ready:
            raise NotReady(self.not_ready)
        name = name or self.default_model
        versions = sorted((v for n, v in self._models if n == name), key=version_key)
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

    def get_for(self, family: str, name: str = "", version: str = "") -> DecoderRuntime:
        if not name and self.ready:
            name = self.default_for(family)
            if not name:
                raise ModelNotFound(f"no {family} model is loaded; loaded models: {', '.join(self.names())}")
        return self.get(name, version)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._models})

    def models(self) -> list[DecoderRuntime]:
        return [self._models[key] for key in sorted(self._models, key=lambda k: (k[0], version_key(k[1])))]
