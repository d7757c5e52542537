"""bench/engine_ceiling.py drives the real engine process on its socket, as a front-end does: its submitters'
records are answered, and what it reports comes from the engine process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attention_pb.v1 import attention_pb2 as pb  # noqa: E402
from bench.engine_ceiling import ceiling  # noqa: E402

SENTENCES = ["Ich habe Hunger.", "Das Haus ist groß.", "Wo ist der Bahnhof?", "Guten Morgen."]


def test_the_engine_answers_the_submitters_records(models_dir: Path) -> None:
    options = pb.DecodingOptions(beam_size=2, max_output_tokens=6, attention=pb.ATTENTION_DETAIL_FULL)
    [row] = ceiling(models_dir / "tiny-de-en" / "1", SENTENCES, options, [2], window=4, seconds=1.0)
    assert (row["model"], row["beam"], row["submitters"], row["window"]) == ("tiny-de-en", 2, 2, 4)
    assert row["sentences_per_s"] > 0 and row["refused"] == {}  # every record answered, none refused
    assert row["engine_cores"] > 0 and row["engine_cpu_ms_per_sentence"] > 0
    assert row["rows_per_decoder_call"] >= 2  # a beam of two is two rows
