"""Iteration-level batching changes nothing a client can see: 200 sentences sent concurrently (decoded together,
joining and leaving the batch at different steps) get the same hypotheses and attention as each sent alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from attention_pb.v1 import attention_pb2 as pb
from tests.conftest import DING_SAMPLE
from tests.integration.serving import RunningServer, matrix, settings

SENTENCES = 200


def sources() -> list[str]:
    """The fixture's test-split sources first, then the others, without repeats."""
    from training.data.corpus import load_corpus, split

    parts = split(load_corpus(f"ding:{DING_SAMPLE}"))
    seen: dict[str, None] = {}
    for name in ("test", "valid", "train"):
        for pair in parts[name]:
            seen.setdefault(pair.source, None)
    return list(seen)[:SENTENCES]


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[RunningServer]:
    running = RunningServer(settings(models_dir))
    yield running
    running.close()


def _mean_requests_per_step(server: RunningServer) -> tuple[float, float]:
    labels = {"model": "tiny-de-en", "version": "1"}
    registry = server.server.metrics.registry
    return (registry.get_sample_value("attn_batch_requests_sum", labels) or 0.0,
            registry.get_sample_value("attn_batch_requests_count", labels) or 0.0)


@pytest.mark.parametrize("beam", [1, 4])
def test_concurrent_batched_serving_equals_single_request_serving(server: RunningServer, beam: int) -> None:
    texts = sources()
    assert len(texts) == SENTENCES
    options = pb.DecodingOptions(beam_size=beam, nbest=beam, attention=pb.ATTENTION_DETAIL_FULL)
    requests = [pb.TranslateRequest(texts=[t], options=options) for t in texts]

    before = _mean_requests_per_step(server)
    alone = [server.stub.Translate(r, timeout=120) for r in requests]  # one at a time: each alone in its steps
    after_alone = _mean_requests_per_step(server)
    futures = [server.stub.Translate.future(r, timeout=300) for r in requests]
    together = [f.result() for f in futures]
    after_together = _mean_requests_per_step(server)

    steps_alone = after_alone[1] - before[1]
    assert after_alone[0] - before[0] == steps_alone  # every step held one request
    batched = (after_together[0] - after_alone[0]) / (after_together[1] - after_alone[1])
    assert batched > 1.3, f"the concurrent requests were not batched (mean {batched:.2f} requests per step)"

    for text, a, b in zip(texts, alone, together):
        [ta], [tb] = a.translations, b.translations
        assert [h.text for h in ta.hypotheses] == [h.text for h in tb.hypotheses], text
        for ha, hb in zip(ta.hypotheses, tb.hypotheses):
            assert [t.id for t in ha.tokens] == [t.id for t in hb.tokens]
            assert ha.score == pytest.approx(hb.score, abs=1e-4)
            np.testing.assert_allclose(matrix(ha.attention), matrix(hb.attention), atol=1e-5, err_msg=text)
            assert [(x.source_word, x.target_word) for x in ha.alignments] == [
                (x.source_word, x.target_word) for x in hb.alignments]
