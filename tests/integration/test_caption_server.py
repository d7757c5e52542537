"""``Caption`` over gRPC on the tiny exported captioner, served next to the tiny translator."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from attention_pb.v1 import attention_pb2 as pb
from tests.integration.serving import RunningServer, check_spans, matrix, settings
from tests.unit.test_caption_imaging import accepted_inputs, encode, refused_inputs
from training.data.scenes import render, scenes


@pytest.fixture(scope="module")
def both_models(models_dir: Path, caption_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("both-models")
    shutil.copytree(models_dir / "tiny-de-en", root / "tiny-de-en")
    shutil.copytree(caption_models_dir / "tiny-scenes", root / "tiny-scenes")
    return root


@pytest.fixture(scope="module")
def server(both_models: Path) -> Iterator[RunningServer]:
    running = RunningServer(settings(both_models, max_image_pixels=10_000_000))
    yield running
    running.close()


def scene_png(index: int = 0) -> bytes:
    return encode(render(scenes("test", index + 1)[index]), "PNG")


def caption(server: RunningServer, image: bytes, **options: int) -> pb.CaptionResponse:
    request = pb.CaptionRequest(image=image, options=pb.DecodingOptions(**options))
    response: pb.CaptionResponse = server.stub.Caption(request, timeout=60)
    return response


def test_caption_happy_path(server: RunningServer) -> None:
    response = caption(server, scene_png(), beam_size=1)
    assert (response.model, response.version) == ("tiny-scenes", "1")  # the captioner, though it is not the default
    assert (response.image_size.width, response.image_size.height) == (96, 96)
    assert (response.grid.height, response.grid.width) == (12, 12)
    (best,) = response.hypotheses
    assert best.text and best.tokens[-1].special
    check_spans(best.text, best.tokens)
    weights = matrix(best.attention)
    assert weights.shape == (len(best.tokens), 144)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    assert len(best.peak_boxes) == len(best.tokens)
    for row, box in zip(weights, best.peak_boxes):
        r, c = divmod(int(row.argmax()), 12)  # the box is the peak cell, in input-image pixels
        assert (box.x0, box.y0, box.x1, box.y1) == (c * 8, r * 8, c * 8 + 8, r * 8 + 8)


def test_caption_beam_nbest_and_detail(server: RunningServer) -> None:
    response = caption(server, scene_png(1), beam_size=3, nbest=2)
    assert len(response.hypotheses) == 2
    assert response.hypotheses[0].score >= response.hypotheses[1].score
    bare = caption(server, scene_png(1), beam_size=1, attention=pb.ATTENTION_DETAIL_NONE)
    assert bare.hypotheses[0].text and not bare.hypotheses[0].attention.rows and not bare.hypotheses[0].peak_boxes


@pytest.mark.parametrize("name", sorted(accepted_inputs()))
def test_accepted_image_kinds(server: RunningServer, name: str) -> None:
    data = accepted_inputs()[name]
    response = caption(server, data, beam_size=1)
    size = (30, 20) if name == "png16" or name.startswith("animated-gif") else (60, 40)
    assert (response.image_size.width, response.image_size.height) == size
    boxes = response.hypotheses[0].peak_boxes
    assert boxes and all(b.x1 <= size[0] and b.y1 <= size[1] for b in boxes)


@pytest.mark.parametrize("name", sorted(refused_inputs()))
def test_bad_images_are_invalid_argument_and_do_no_harm(server: RunningServer, name: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        caption(server, refused_inputs()[name], beam_size=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in error.value.details()
    if name == "png-30000x30000":
        assert "max_image_pixels" in error.value.details()
    assert caption(server, scene_png(), beam_size=1).hypotheses[0].text  # the server still answers


def test_pixel_limit_is_the_servers_setting(server: RunningServer) -> None:
    from tests.unit.test_caption_imaging import png_claiming

    with pytest.raises(grpc.RpcError) as error:
        caption(server, png_claiming(4000, 3000), beam_size=1)  # 12 MP: under Pillow's guard, over ours (10 MP)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10000000" in error.value.details() and "max_image_pixels" in error.value.details()


def test_families_do_not_mix(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Caption(pb.CaptionRequest(model="tiny-de-en", image=scene_png()), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Translate(pb.TranslateRequest(model="tiny-scenes", texts=["Hallo"]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    families = {m.name: m.family for m in server.stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert families == {"tiny-de-en": "translation", "tiny-scenes": "captioning"}
    # Counted under the model the call named, which is loaded (an unknown model is counted under model="")
    registry = server.server.metrics.registry
    for rpc, model in (("Caption", "tiny-de-en"), ("Translate", "tiny-scenes")):
        labels = {"rpc": rpc, "model": model, "version": "1", "code": "INVALID_ARGUMENT"}
        assert registry.get_sample_value("attn_requests_total", labels) == 1, rpc


def test_a_v2_batch_of_images_is_one_request_to_the_models_queue(both_models: Path) -> None:
    """The V2 protocol's images are one request in the model's queue, as its texts are: a batch that an empty queue
    could never hold is INVALID_ARGUMENT at once (a retry cannot help), not RESOURCE_EXHAUSTED "retry later" for
    one of its images, and a batch that fits is not refused for taking one queue slot per image."""
    from kserve_v2_pb import grpc_service_pb2 as v2
    from kserve_v2_pb import grpc_service_pb2_grpc as v2_grpc

    running = RunningServer(settings(both_models, max_queue_requests=1, max_queue_tokens=400))  # 12×12 grid cells
    try:
        infer = v2_grpc.GRPCInferenceServiceStub(running.channel).ModelInfer

        def request(count: int) -> v2.ModelInferRequest:
            message = v2.ModelInferRequest(model_name="tiny-scenes")
            tensor = message.inputs.add(name="IMAGE", datatype="BYTES", shape=[count, 1])
            tensor.contents.bytes_contents.extend(scene_png(i) for i in range(count))
            message.parameters["beam_size"].int64_param = 1
            return message

        for _ in range(3):
            assert [o.name for o in infer(request(2), timeout=60).outputs][0] == "CAPTION"  # 288 cells, one request
        with pytest.raises(grpc.RpcError) as error:
            infer(request(3), timeout=60)  # 432 cells
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "432" in error.value.details() and "max_queue_tokens" in error.value.details()
    finally:
        running.close()


def test_attn_caption_command(server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(2))
    overlay = tmp_path / "overlay.png"
    code = main(["caption", str(image), "--target", f"127.0.0.1:{server.port}", "--beam", "1",
                 "--overlay", str(overlay)])
    assert code == 0
    out = capsys.readouterr().out
    assert "tiny-scenes/1" in out and "grid 12×12" in out and "x " in out
    assert overlay.stat().st_size > 0
