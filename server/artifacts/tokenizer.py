"""SentencePiece tokenization that keeps every token's character span in the original text.

Shared by the exporter and the server (it needs only ``sentencepiece``). SentencePiece reports UTF-8 *byte*
offsets; the API speaks in Python string (code point) offsets, so both directions are converted here once.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import sentencepiece as spm


class Token(NamedTuple):
    """One subword: its vocabulary id, its piece (``▁`` marks a word start) and its span ``text[start:end]``. A
    named tuple: responses build one per token, and a tuple is built several times faster than a dataclass."""

    id: int
    piece: str
    start: int
    end: int


# Bytes that start a UTF-8 character map to 1, continuation bytes (0b10xxxxxx) to 0.
_STARTS = bytes(0 if 0x80 <= b < 0xC0 else 1 for b in range(256))


def _char_offsets(text: str) -> list[int] | None:
    """Map every UTF-8 byte offset of ``text`` (and its end) to a code point offset: that of the character the byte
    belongs to; None for ASCII, where the two are equal. A running count in C: for a sentence, several times faster
    than numpy's calls."""
    if text.isascii():
        return None
    table = list(accumulate(text.encode("utf-8").translate(_STARTS), initial=-1))
    del table[0]  # table[b]: character starts in bytes 0..b, less one
    table.append(len(text))
    return table


def _tokens(proto: Any, text: str) -> list[Token]:
    table = _char_offsets(text)
    if table is None:
        return [Token(p.id, p.piece, p.begin, p.end) for p in proto.pieces]
    return [Token(p.id, p.piece, table[p.begin], table[p.end]) for p in proto.pieces]


class Tokenizer:
    """A trained SentencePiece model with the special ids the models use."""

    def __init__(self, model_proto: bytes) -> None:
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id = self.processor.pad_id()
        self.unk_id = self.processor.unk_id()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode_ids(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def encode(self, text: str) -> list[Token]:
        """Tokens of ``text`` with spans into ``text`` itself (not into a normalised copy)."""
        return _tokens(self.processor.encode(text, return_type="proto"), text)

    def decode(self, ids: list[int]) -> tuple[str, list[Token]]:
        """The detokenized text of ``ids`` (specials dropped) and each token's span in that text."""
        kept = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        if not kept:  # sentencepiece 0.2.2 takes an empty list for an empty string, and fails on it as a proto
            return "", []
        proto = self.processor.decode(kept, return_type="proto")
        text = proto.text
        tokens = _tokens(proto, text)
        # SentencePiece drops the space of a leading "▁" piece but keeps a trailing one's, and an undertrained
        # model may end on "▁" pieces: the text would end in whitespace. Those tokens keep an empty span at the
        # text's end, as a leading "▁" has one at its start (and belong to no word).
        shown = text.rstrip()
        if len(shown) < len(text):
            n = len(shown)
            tokens = [t if t.end <= n else t._replace(start=min(t.start, n), end=n) for t in tokens]
        return shown, tokens

    def piece(self, token_id: int) -> str:
        return str(self.processor.id_to_piece(token_id))
