"""Every attention family served by the same runtime path: Translate returns a labelled matrix for each, and a
multi-head model's layer and head are selectable per request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from attention_pb.v1 import attention_pb2 as pb
from tests.conftest import VARIANTS
from tests.integration.serving import RunningServer, check_hypothesis, matrix, settings

TEXT = "Das Haus ist groß und schön."


@pytest.fixture(scope="module")
def served(variant_models_dir: Path) -> Iterator[RunningServer]:
    server = RunningServer(settings(variant_models_dir, default_model="tiny-bahdanau"))
    yield server
    server.close()


def _translate(served: RunningServer, model: str, **options: object) -> pb.TranslateResponse:
    request = pb.TranslateRequest(model=model, texts=[TEXT], options=pb.DecodingOptions(**options))  # type: ignore[arg-type]
    return served.stub.Translate(request, timeout=60)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("beam", [1, 3])
def test_translate_through_every_family(served: RunningServer, variant: str, beam: int) -> None:
    response = _translate(served, f"tiny-{variant}", beam_size=beam, nbest=min(beam, 2))
    [translation] = response.translations
    for hyp in translation.hypotheses:
        check_hypothesis(translation, hyp)
        weights = matrix(hyp.attention)
        assert weights.shape == (len(hyp.tokens), len(translation.source_tokens))
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-4)
        if variant == "none":  # uniform by construction, and flagged so
            np.testing.assert_allclose(weights, 1.0 / weights.shape[1], atol=1e-5)
        if variant in ("local-m", "local-p"):
            assert (weights == 0).any(), "a local window of half-width 3 leaves source tokens out"


def test_list_models_describes_each_family(served: RunningServer) -> None:
    models = {m.name: m for m in served.stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert set(models) == {f"tiny-{v}" for v in VARIANTS}
    assert models["tiny-none"].attention_uniform and not models["tiny-bahdanau"].attention_uniform
    transformer = models["tiny-transformer"]
    assert transformer.architecture == "transformer"
    assert (transformer.attention_layers, transformer.attention_heads) == (2, 4)
    assert transformer.attention_layer == 1 and transformer.attention_head == -1  # last layer, mean over heads
    assert models["tiny-luong-general"].attention_layers == 0


def test_transformer_layer_and_head_are_selectable_per_request(served: RunningServer) -> None:
    default = _translate(served, "tiny-transformer").translations[0].hypotheses[0]
    same = _translate(served, "tiny-transformer", attention_layer=1, attention_head=-1).translations[0].hypotheses[0]
    np.testing.assert_allclose(matrix(same.attention), matrix(default.attention), atol=1e-6)
    heads = [
        matrix(_translate(served, "tiny-transformer", attention_layer=0, attention_head=h)
               .translations[0].hypotheses[0].attention)
        for h in range(4)
    ]
    mean = matrix(_translate(served, "tiny-transformer", attention_layer=0, attention_head=-1)
                  .translations[0].hypotheses[0].attention)
    # The selection changes only what is reported, never the translation, so the four heads line up row by row.
    np.testing.assert_allclose(np.mean(heads, axis=0), mean, atol=1e-5)
    for h in heads:
        np.testing.assert_allclose(h.sum(1), 1.0, atol=1e-4)
    assert not np.allclose(heads[0], heads[1], atol=1e-4)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("tiny-transformer", {"attention_layer": 2}, "attention_layer 2 is not a layer"),
        ("tiny-transformer", {"attention_head": 4}, "attention_head 4 is not -1"),
        ("tiny-bahdanau", {"attention_head": 0}, "multi-head models only"),
    ],
)
def test_bad_attention_selection_is_invalid_argument(
    served: RunningServer, model: str, options: dict[str, int], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _translate(served, model, **options)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.value.details() or "")
