"""The client's text views, on hand-made responses."""

from __future__ import annotations

from attention_pb.v1 import attention_pb2 as pb
from client import render


def _words(text: str) -> list[pb.Word]:
    out, position = [], 0
    for word in text.split():
        start = text.index(word, position)
        out.append(pb.Word(text=word, start=start, end=start + len(word)))
        position = start + len(word)
    return out


def test_alignment_lines_list_the_attended_source_words_strongest_first() -> None:
    hyp = pb.Hypothesis(
        text="I hope", words=_words("I hope"),
        word_attention=pb.Matrix(rows=2, cols=3, values=[0.8, 0.15, 0.05, 0.05, 0.9, 0.01]),
    )
    lines = render.alignment_lines(_words("Ich hoffe es"), hyp)
    assert lines == ["  I     ← Ich 0.80 · hoffe 0.15", "  hope  ← hoffe 0.90"]


def test_no_word_attention_no_alignment_view() -> None:
    assert render.alignment_lines(_words("Ich"), pb.Hypothesis(text="I", words=_words("I"))) == []


def test_translation_view() -> None:
    response = pb.TranslateResponse(model="m", version="2", translations=[pb.Translation(
        source_words=_words("Hallo"),
        hypotheses=[pb.Hypothesis(text="Hello", score=-0.5, words=_words("Hello"),
                                  word_attention=pb.Matrix(rows=1, cols=1, values=[0.97]))],
    )])
    assert render.translation(response, ["Hallo"]).splitlines() == [
        "Hallo",
        "→ Hello    (score -0.500)",
        "  alignment (target word ← source words it attends to, share of its attention):",
        "  Hello  ← Hallo 0.97",
        "",
        "[m/2]",
    ]


def test_models_table() -> None:
    response = pb.ListModelsResponse(models=[pb.ModelInfo(
        name="de-en", version="1", family="translation", source_language="de", target_language="en",
        attention_type="bahdanau", device="cpu", variant="fp32", ready=True, is_default=True,
    )])
    header, row = render.models(response).splitlines()
    assert row.split() == ["de-en", "1", "translation", "de→en", "bahdanau", "cpu", "fp32", "yes", "*"]
