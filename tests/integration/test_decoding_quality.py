"""bench/decoding_quality.py scores what a client gets: the exported model through the server's decoding, greedy
and beam, with sources the model refuses counted and scored as empty."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.decoding_quality import translate  # noqa: E402
from server.artifacts import Manifest  # noqa: E402
from server.device import CPU, Device  # noqa: E402
from server.translation import DecodeOptions, TranslationModel  # noqa: E402


def test_greedy_and_beam_translations_in_source_order_with_refusals(models_dir: Path) -> None:
    directory = models_dir / "tiny-de-en" / "1"
    model = TranslationModel(directory, Manifest.load(directory), Device("cpu", [CPU], "test"), threads=1)
    sources = ["Hund", "ein sehr langer Satz " * 200, "Die Katze schläft.", "Haus"]
    greedy, refused = translate(model, sources, beam=1, batch=2)
    assert refused == 1 and greedy[1] == ""
    # Each text is what the server gives for that source alone, whatever batch it was decoded in.
    for source, text in zip(sources, greedy):
        if text:
            [alone] = model.translate(model.prepare([source]), DecodeOptions(beam_size=1, word_alignments=False))
            assert text == alone.hypotheses[0].text
    beam, _ = translate(model, sources, beam=4)
    [best] = model.translate(model.prepare([sources[2]]), DecodeOptions(beam_size=4, word_alignments=False))
    assert beam[2] == best.hypotheses[0].text
