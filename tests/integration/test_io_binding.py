"""Exported models through the I/O-bound decoder step (what CUDA runs), on the CPU provider: a recurrent model and a
Transformer (growing key/value cache, per-request layer and head) must translate exactly as the plain path does,
alone and through the serving engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server import iobinding, reductions
from server.artifacts import Manifest
from server.device import CPU, Device, session
from server.engine import Engine, Limits
from server.iobinding import DeviceTensor
from server.registry import warm_serving_path
from server.translation import DecodeOptions, Result, TranslationModel

PLAIN = Device("cpu", [CPU], "test")
BOUND = Device("cpu", [CPU], "test", io_binding=True)
TEXTS = ["Das Haus ist groß.", "Ich habe Hunger und Durst, aber kein Geld.", "Guten Morgen!", "Wo ist der Bahnhof?"]


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_variant: Callable[[str], Path]) -> Path:
    from exporter.export import ExportOptions, export

    out = tmp_path_factory.mktemp("bound-transformer") / "tiny-transformer" / "1"
    export(tiny_variant("transformer"), out, ExportOptions(name="tiny-transformer", parity_sentences=10))
    return out


def load(directory: Path, device: Device, variant: str = "") -> TranslationModel:
    return TranslationModel(directory, Manifest.load(directory), device, variant, threads=1)


def identical(found: list[Result], expected: list[Result]) -> None:
    for a, b in zip(found, expected, strict=True):
        assert [h.text for h in a.hypotheses] == [h.text for h in b.hypotheses]
        assert [h.log_prob for h in a.hypotheses] == [h.log_prob for h in b.hypotheses]
        for h, w in zip(a.hypotheses, b.hypotheses):
            np.testing.assert_array_equal(h.attention, w.attention)


OPTIONS = [DecodeOptions(beam_size=1), DecodeOptions(beam_size=4, nbest=3)]


@pytest.mark.parametrize("variant", ["", "int8"])
@pytest.mark.parametrize("options", OPTIONS)
def test_a_recurrent_model_translates_exactly_as_without_binding(models_dir: Path, variant: str,
                                                                 options: DecodeOptions) -> None:
    directory = models_dir / "tiny-de-en" / "1"
    plain, bound = load(directory, PLAIN, variant), load(directory, BOUND, variant)
    sources = plain.prepare(TEXTS)
    identical(bound.translate(sources, options), plain.translate(sources, options))
    state, static = bound.encode([s.ids for s in sources])
    _, _, new_state = bound.step(np.full(len(sources), bound.bos_id), state, static)
    assert all(isinstance(v, DeviceTensor) for v in new_state.values())


@pytest.mark.parametrize("options", [*OPTIONS, DecodeOptions(beam_size=3, nbest=2, attention_layer=0,
                                                              attention_head=1)])
def test_a_transformer_translates_exactly_as_without_binding(transformer_dir: Path, options: DecodeOptions) -> None:
    plain, bound = load(transformer_dir, PLAIN), load(transformer_dir, BOUND)
    sources = plain.prepare(TEXTS)
    identical(bound.translate(sources, options), plain.translate(sources, options))
    bound.warm_up()


@pytest.mark.parametrize("which", ["recurrent", "transformer"])
def test_the_engine_serves_bound_models(models_dir: Path, transformer_dir: Path, which: str) -> None:
    """Requests of different beams, lengths and attention selections decoded together, as the server does."""
    directory = models_dir / "tiny-de-en" / "1" if which == "recurrent" else transformer_dir
    plain, bound = load(directory, PLAIN), load(directory, BOUND)
    heads = {"attention_layer": 0, "attention_head": -1} if which == "transformer" else {}
    requests = [(TEXTS[:2], DecodeOptions(beam_size=4, nbest=2)), (TEXTS[2:], DecodeOptions(**heads)),  # type: ignore[arg-type]
                (TEXTS[1:3], DecodeOptions(beam_size=2)), (TEXTS[3:], DecodeOptions(beam_size=3, **heads))]  # type: ignore[arg-type]
    engine = Engine(bound, Limits())
    try:
        futures = [engine.submit([s.ids for s in bound.prepare(texts)], options) for texts, options in requests]
        for future, (texts, options) in zip(futures, requests):
            sources = plain.prepare(texts)
            found = bound.finish(sources, future.result(timeout=120), options)
            expected = plain.translate(sources, options)
            for a, b in zip(found, expected, strict=True):
                assert [h.text for h in a.hypotheses] == [h.text for h in b.hypotheses]
                for h, w in zip(a.hypotheses, b.hypotheses):
                    assert h.log_prob == pytest.approx(w.log_prob, abs=1e-4)
                    np.testing.assert_allclose(h.attention, w.attention, atol=1e-5)
    finally:
        engine.close()


@pytest.mark.parametrize(("which", "device"), [("recurrent", PLAIN), ("recurrent", BOUND), ("transformer", BOUND)],
                         ids=["recurrent-plain", "recurrent-bound", "transformer-bound"])
def test_after_the_warm_up_at_load_serving_makes_no_session(models_dir: Path, transformer_dir: Path, which: str,
                                                             device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the serving path makes on first use (the search's reductions, the joins and gathers of rows on the
    device) is made while the model loads (``warm_serving_path``, as the registry does), not on a request: with a
    provider that is slow to start a session (CUDA) a first request paid for each."""
    directory = models_dir / "tiny-de-en" / "1" if which == "recurrent" else transformer_dir
    model = load(directory, device)
    model.warm_up()
    warm_serving_path(model)
    made: list[object] = []

    def counted(graph: Path | bytes, on: Device, threads: int) -> object:
        made.append(graph)
        return session(graph, on, threads)

    monkeypatch.setattr(iobinding, "session", counted)
    monkeypatch.setattr(reductions, "session", counted)
    engine = Engine(model, Limits())
    try:
        first = engine.submit([s.ids for s in model.prepare(TEXTS[:2])], DecodeOptions(beam_size=4, nbest=2))
        while engine.active == 0 and not first.done():  # the others join its lane while it decodes
            time.sleep(0.0005)
        others = [engine.submit([s.ids for s in model.prepare([text])], DecodeOptions(beam_size=beam))
                  for text, beam in zip(TEXTS[2:], [1, 3])]
        for future in [first, *others]:
            assert future.result(timeout=120)
    finally:
        engine.close()
    assert made == []
