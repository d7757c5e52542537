"""The model card's examples are Markdown a reader sees rendered: each translation stays bold whatever the model
wrote, even nothing or a text that ends in a space (an undertrained model's repeated word pieces)."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.card import _example, bold
from server.artifacts import Tokenizer
from training.data.corpus import Pair
from training.tokenizer import train_tokenizer

SOURCE = "Die Straße ist über die Brücke gesperrt."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    pairs = [Pair(SOURCE, "The street across the bridge is closed."), Pair("Ich hoffe.", "I hope.")] * 40
    return Tokenizer(train_tokenizer(pairs, vocab_size=400))


def _decoding(ids: list[int], source_len: int):  # type: ignore[no-untyped-def]
    """An ONNX greedy decoder's stand-in that writes ``ids``, attention on the first source token."""
    def decode(batch: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
        attention = np.zeros((len(ids) + 1, source_len), dtype=np.float32)
        attention[:, 0] = 1.0
        return [ids], [attention]
    return decode


def _headline(tokenizer: Tokenizer, ids: list[int]) -> str:
    source_len = len(tokenizer.encode(SOURCE)) + 1
    return _example(_decoding(ids, source_len), tokenizer, SOURCE)[0]  # type: ignore[arg-type]


def test_a_translation_that_ends_in_word_start_pieces_stays_bold(tokenizer: Tokenizer) -> None:
    ids = tokenizer.processor.encode("The street") + [tokenizer.processor.piece_to_id("▁")] * 2
    assert _headline(tokenizer, ids) == f"- **{SOURCE}** → **The street**"


def test_an_empty_translation_is_named_not_left_as_four_asterisks(tokenizer: Tokenizer) -> None:
    assert _headline(tokenizer, []) == f"- **{SOURCE}** → *(empty translation)*"


@pytest.mark.parametrize(("text", "what", "shown"), [
    ("a cat ", "caption", "**a cat**"),
    ("", "caption", "*(empty caption)*"),
    (" ", "translation", "*(empty translation)*"),
])
def test_bold_text_on_a_card_is_trimmed_or_named_empty(text: str, what: str, shown: str) -> None:
    assert bold(text, what) == shown
