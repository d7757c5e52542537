"""Settings from flags, ``ATTN_*`` variables and defaults; every setting documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults() -> None:
    s = Settings.from_sources([], environ={})
    assert (s.port, s.metrics_port, s.models_dir, s.device) == (50051, 9464, "models", "auto")


def test_environment_then_flags() -> None:
    env = {"ATTN_PORT": "6000", "ATTN_METRICS_PORT": "-1", "ATTN_MODELS_DIR": "/m", "ATTN_GRACE_SECONDS": "2.5"}
    s = Settings.from_sources([], environ=env)
    assert (s.port, s.metrics_port, s.models_dir, s.grace_seconds) == (6000, -1, "/m", 2.5)
    s = Settings.from_sources(["--port", "7000", "--device", "cpu"], environ=env)
    assert (s.port, s.device, s.models_dir) == (7000, "cpu", "/m")


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--device", "tpu"], {}, "invalid choice"),
    ([], {"ATTN_DEVICE": "tpu"}, "device must be one of"),
    # The empty variant (the fp32 graphs) is one of the choices, and shows as one.
    ([], {"ATTN_VARIANT": "fp32"}, "variant must be one of '', 'int8', 'fp16', not 'fp32'"),
    ([], {"ATTN_PORT": "fifty"}, "ATTN_PORT='fifty' is not a valid int"),
    (["--max-texts", "0"], {}, "max_texts must be at least 1"),
    (["--default-beam-size", "8", "--max-beam-size", "4"], {}, "exceeds max_beam_size"),
    # An image the settings allow but gRPC's receive limit refuses: RESOURCE_EXHAUSTED naming no setting.
    ([], {"ATTN_MAX_IMAGE_BYTES": str(20 * 2**20)}, "max_image_bytes 20971520 does not fit in a request of "
     "max_receive_bytes 16777216"),
    (["--max-receive-bytes", "1000"], {}, "raise max_receive_bytes too"),
    ([], {"ATTN_MAX_CONNECTION_AGE": "-1"}, "max_connection_age must not be negative"),
    (["--mixed-lane-rows", "-1"], {}, "mixed_lane_rows must not be negative"),
    (["--engines", "0"], {}, "engines must be at least 1"),
    (["--engines", "2", "--frontends", "0"], {}, "engines 2 needs front-end processes"),
    (["--port", "99999"], {}, "port must be at most 65535"),
    ([], {"ATTN_METRICS_PORT": "70000"}, "metrics_port must be -1 (off) or 0 to 65535, not 70000"),
    (["--metrics-port", "-5"], {}, "metrics_port must be -1 (off) or 0 to 65535, not -5"),
    (["--grace-seconds", "nan"], {}, "grace_seconds must be a finite number, not nan"),
    ([], {"ATTN_RELOAD_INTERVAL": "nan"}, "reload_interval must be a finite number, not nan"),
    (["--max-connection-age", "inf"], {}, "max_connection_age must be a finite number, not inf"),
])
def test_bad_settings_exit_with_a_message(argv: list[str], env: dict[str, str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Settings.from_sources(argv, environ=env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_engines_limits_come_from_the_settings() -> None:
    """What the engines of this process (or of the engine process) schedule by: build_registry's Limits."""
    from prometheus_client import CollectorRegistry

    from server.app import build_registry
    from server.metrics import Metrics

    s = Settings.from_sources(["--device", "cpu", "--max-batch-rows", "1024", "--mixed-lane-rows", "1024"],
                              environ={"ATTN_MAX_QUEUE_TOKENS": "4096", "ATTN_BATCHING": "false"})
    limits = build_registry(s, Metrics(CollectorRegistry())).limits
    assert (limits.max_batch_rows, limits.mixed_lane_rows, limits.max_queue_tokens, limits.max_batch_requests) == (
        1024, 1024, 4096, 1)


def test_the_lanes_setting_says_what_the_engine_does() -> None:
    """ATTN_MIXED_LANE_ROWS's help names the engine's longest length bucket and its default is the engine's: the
    settings module imports nothing of the engine's, so the two are written twice and checked here."""
    from dataclasses import fields

    from server.engine import LENGTH_BUCKETS, Limits

    setting = next(f for f in fields(Settings) if f.name == "mixed_lane_rows")
    assert f"sources of up to {LENGTH_BUCKETS[-1]} tokens share" in setting.metadata["help"]
    assert setting.default == Limits().mixed_lane_rows


def test_readme_documents_every_setting() -> None:
    """The README's settings table is Settings.table(), row by row (flag pairs such as --batching/--no-batching)."""
    readme = README.read_text(encoding="utf-8").splitlines()
    for env, flag, default, meaning in Settings.table():
        row = f"| `{env}` | `{flag}` | `{default}` | {meaning} |"
        assert row in readme, f"the README's settings table differs from Settings.table(); expected the row\n{row}"
    assert ("ATTN_BATCHING", "--batching/--no-batching") in {row[:2] for row in Settings.table()}


def test_readme_documents_every_metric() -> None:
    from server.metrics import DESCRIPTIONS

    readme = README.read_text(encoding="utf-8")
    for name, kind, labels, _ in DESCRIPTIONS:
        assert f"| `{name}` | {kind} | {labels or '—'} |" in readme, \
            f"{name} ({kind}; labels {labels or '—'}) is missing from the README's metrics table"
    documented = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `attn_")}
    assert documented == {name for name, *_ in DESCRIPTIONS}, "the README's metrics table lists metrics never exported"
