"""What every served model family shares: the encoder and decoder-step sessions wired by the manifest's
:class:`DecoderBinding`, the special ids, and the search over the step.

A family (:mod:`server.translation`, :mod:`server.captioning`) adds how its inputs become encoder feeds and how
hypotheses become results. The serving engine (:mod:`server.engine`) drives any of them through the same few
methods: :meth:`encode`, :meth:`step_reduced` (or :meth:`step_rows`), :meth:`budget_for`, :meth:`src_len` and
:meth:`search_for`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from server import search
from server.artifacts import Manifest, ManifestError, Tokenizer
from server.device import Device, session
from server.iobinding import BoundStep, RowGather
from server.reductions import Candidates, Reduction

SRC_AXIS = "src_len"


class DecoderRuntime:
    family = ""
    variant = "fp32"  # which of the manifest's graph variants is loaded
    _all_heads: str | None = None  # multi-head models: the step's output of every layer's and head's attention
    _reduction: Reduction | None = None  # the search's reductions on the step's provider, made on first use

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession

    def __init__(self, directory: Path, manifest: Manifest, device: Device | None, files: dict[str, str],
                 threads: int, tokenizer: Tokenizer | None = None):
        """``device=None`` opens the model without its graphs: what a front-end process needs (tokenizer, limits,
        manifest) to validate requests and build responses, while the engine process runs the graphs.
        ``tokenizer``: the one the engine process loaded (a front-end's view reads nothing from ``directory``)."""
        self.directory, self.manifest, self.device = directory, manifest, device
        self.device_name = device.name if device is not None else ""  # a front-end's view: the engine's device
        self.tokenizer = tokenizer or Tokenizer.load(directory / manifest.tokenizer["file"])
        self._bound: BoundStep | None = None
        if device is not None:
            self.encoder = session(directory / files["encoder"], device, threads)
            self.decoder = session(directory / files["decoder_step"], device, threads)
            # CUDA: the step's state stays on the GPU between steps (server/iobinding.py); the CPU feeds numpy.
            self._bound = BoundStep(self.decoder, device) if device.io_binding else None
        binding = manifest.decoder
        self._state_inputs = list(binding.state)
        self._outputs = [binding.log_probs_output, binding.attention_output, *binding.state.values()]
        specs = {t.name: t for t in manifest.decoder_step.inputs}
        missing = [n for n in [binding.token_input, *binding.static_inputs, *binding.state] if n not in specs]
        if missing:
            raise ManifestError(f"{directory}: the decoder binding names inputs the step graph lacks: {missing}")
        self._token_dtype = np.dtype(specs[binding.token_input].dtype)
        # Axes the engine pads when sources of different lengths share a batch (zeros, masked out by the mask).
        self.src_axes = {name: spec.shape.index(SRC_AXIS) for name, spec in specs.items()
                         if SRC_AXIS in spec.shape and name in (*binding.static_inputs, binding.mask_input)}
        # State whose size grows with the steps (a Transformer's key/value cache): rows at different steps cannot
        # share a call, because the step graph has no mask over cache positions.
        self.growing_state = any(isinstance(d, str) for name in binding.state for d in specs[name].shape[1:])
        ids = manifest.special_ids
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.banned = sorted({self.pad_id, self.bos_id} - {self.eos_id})  # never generated
        self.max_target_tokens = int(manifest.limits["max_target_tokens"])

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def info(self) -> dict[str, Any]:
        """What ListModels reports."""
        raise NotImplementedError

    def warm_up(self) -> float:
        """Runs every graph once, so the first request pays no lazy initialisation; returns the seconds it took."""
        raise NotImplementedError

    def warm_up_item(self) -> Any:
        """An engine item (what :meth:`encode` takes) for the warm-up of the serving path at load
        (:func:`server.registry.warm_serving_path`)."""
        raise NotImplementedError

    # -- what the engine calls ---------------------------------------------------------------------------------

    def encode(self, items: Sequence[Any]) -> tuple[search.State, search.State]:
        """(initial decoder state, static decoder inputs), one row per item."""
        raise NotImplementedError

    def src_len(self, item: Any) -> int | None:
        """Attention columns that belong to ``item`` (``None``: every column; a grid has no padding)."""
        return None

    def budget_for(self, item: Any, options: Any) -> int:
        """Decoder steps for ``item``, EOS included."""
        raise NotImplementedError

    def cost(self, item: Any) -> int:
        """Source positions ``item`` occupies in a batch: what the engine's token budgets count."""
        return self.src_len(item) or 1

    def step(self, tokens: np.ndarray, state: search.State, static: search.State) -> tuple[
            np.ndarray, np.ndarray, search.State]:
        log_probs, attention, new_state, _ = self.run_step(tokens, state, static)
        return log_probs, attention, new_state

    def run_step(self, tokens: np.ndarray, state: search.State, static: search.State, extra: Sequence[str] = ()) -> \
            tuple[np.ndarray, np.ndarray, search.State, list[np.ndarray]]:
        """One decoder call: log-probabilities, attention, the next state, and the ``extra`` outputs asked for.

        With I/O binding (``device.io_binding``: CUDA) the next state's values are
        :class:`~server.iobinding.DeviceTensor`, left in device memory; the engine's and the search's ``take`` on them
        gathers rows on the device."""
        binding = self.manifest.decoder
        feeds = {binding.token_input: tokens.astype(self._token_dtype)}
        n = len(self._state_inputs)
        if self._bound is None:
            log_probs, attention, *rest = self.decoder.run([*self._outputs, *extra], {**feeds, **static, **state})
            return log_probs, attention, dict(zip(self._state_inputs, rest[:n], strict=True)), rest[n:]
        host, kept = self._bound.run([binding.log_probs_output, binding.attention_output, *extra],
                                     list(binding.state.values()), feeds, static, state)
        # A DeviceTensor is not an ndarray: the engine and the search only take() and concatenate state (see it).
        new_state = {name: cast(np.ndarray, value) for name, value in zip(self._state_inputs, kept, strict=True)}
        return host[0], host[1], new_state, host[2:]

    def step_rows(self, tokens: np.ndarray, state: search.State, static: search.State, all_heads: bool) -> tuple[
            np.ndarray, np.ndarray, search.State, np.ndarray | None]:
        """:meth:`step`, plus every layer's and head's attention when ``all_heads`` (multi-head models only)."""
        return (*self.step(tokens, state, static), None)

    def step_reduced(self, tokens: np.ndarray, state: search.State, static: search.State, all_heads: bool,
                     width: int, banned: Sequence[int]) -> tuple[Candidates, np.ndarray, search.State,
                                                                 np.ndarray | None]:
        """:meth:`step_rows` with the search's reduction of the log-probabilities (``width`` candidates per row,
        ``banned`` ids never among them) done where the step ran (:mod:`server.reductions`): with I/O binding the
        log-probabilities stay on the device and only the candidates come back."""
        if self._reduction is None:
            assert self.device is not None, "a model opened without its graphs does not decode"
            self._reduction = Reduction(self.device)
        binding = self.manifest.decoder
        extra = [self._all_heads] if all_heads and self._all_heads else []
        feeds = {binding.token_input: tokens.astype(self._token_dtype)}
        if self._bound is None:
            log_probs, attention, *rest = self.decoder.run([*self._outputs, *extra], {**feeds, **static, **state})
            n = len(self._state_inputs)
            new_state = dict(zip(self._state_inputs, rest[:n], strict=True))
            every = rest[n] if extra else None
            return self._reduction(log_probs, width, banned, self.eos_id), attention, new_state, every
        host, kept, [log_probs] = self._bound.run_outputs(
            [binding.attention_output, *extra], list(binding.state.values()), [binding.log_probs_output], feeds,
            static, state)
        new_state = {name: cast(np.ndarray, value) for name, value in zip(self._state_inputs, kept, strict=True)}
        candidates = self._reduction(log_probs, width, banned, self.eos_id)
        return candidates, host[0], new_state, host[1] if extra else None

    @property
    def device_kernels(self) -> RowGather | None:
        """With I/O binding: the kernels that gather and join rows on the device, where the engine then keeps
        the static decoder inputs too (as :class:`~server.iobinding.DeviceTensor`); ``None`` on the host."""
        return self._bound.gather if self._bound is not None else None

    def selection(self, options: Any) -> tuple[int, int] | None:
        """The (layer, head) whose attention ``options`` asks for, or ``None`` for the manifest's default."""
        return None

    def select(self, every: np.ndarray, selection: tuple[int, int]) -> np.ndarray:
        """Rows of one layer's head (or the mean over heads, head -1) from :meth:`step_rows`'s ``all_heads``."""
        layer, head = selection
        chosen = every[:, layer]  # (rows, heads, src_len)
        return chosen.mean(axis=1) if head < 0 else chosen[:, head]

    def step_for(self, options: Any) -> search.StepFn:
        """The step whose attention is the one ``options`` asks for."""
        selection = self.selection(options)
        if selection is None:
            return self.step

        def step(tokens: np.ndarray, state: search.State, static: search.State) -> tuple[
                np.ndarray, np.ndarray, search.State]:
            log_probs, _, new_state, every = self.step_rows(tokens, state, static, True)
            assert every is not None
            return log_probs, self.select(every, selection), new_state

        return step

    def search_for(self, options: Any) -> search.Search:
        return search.Search(options.beam_size, self.eos_id, options.nbest, options.length_penalty, self.banned)

    # -- one batch, start to end (warm-up, tests, tools) -----------------------------------------------------

    def decode(self, items: Sequence[Any], options: Any, check: search.Check | None = None) -> list[
            list[search.Hypothesis]]:
        state, static = self.encode(items)
        return search.run_search(
            self.step_for(options), state, static, self.search_for(options), bos=self.bos_id,
            max_steps=[self.budget_for(item, options) for item in items],
            src_lens=[self.src_len(item) for item in items], check=check,
        )
