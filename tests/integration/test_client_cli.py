"""``attn`` against a real server: the readable view, --json, --heatmap, models, and errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import connection
from client.cli import main, parser
from tests.integration.serving import RunningServer, settings
from tests.pki import Pki, make_pki

TEXT = "Ich hoffe, es geht dir gut."


def _target(running: RunningServer) -> list[str]:
    return ["--target", f"127.0.0.1:{running.port}"]


def test_translate_prints_the_translation_and_its_alignment(running: RunningServer,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", TEXT, "--beam", "4", "--nbest", "2", *_target(running)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == TEXT
    assert out[1].startswith("1. ") and any(line.startswith("2. ") for line in out)
    assert any(line.startswith("  alignment (target word ← source words") for line in out)
    arrows = [line for line in out if re.match(r"  \S+ +← ", line)]  # "  hope  ← hoffe, 0.77 · Ich 0.12"
    assert arrows and all(any(re.search(rf"{re.escape(word)} [01]\.\d\d", line) for word in TEXT.split())
                          for line in arrows)
    assert out[-1] == "[tiny-de-en/1]"


def test_translate_json(running: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", TEXT, "Guten Morgen.", "--json", "--beam", "1", *_target(running)]) == 0
    response = json.loads(capsys.readouterr().out)
    assert response["model"] == "tiny-de-en" and len(response["translations"]) == 2
    assert response["translations"][0]["source_tokens"][-1]["piece"] == "</s>"
    # The whole response: fields at their zero value too (the first token's start 0, word 0 of the first word, a
    # hypothesis not truncated), which proto3's JSON would leave out.
    for translation in response["translations"]:
        for token in translation["source_tokens"] + [t for h in translation["hypotheses"] for t in h["tokens"]]:
            assert set(token) == {"id", "piece", "start", "end", "special", "word"}, token
        assert translation["source_tokens"][0]["start"] == 0
        assert [t["word"] for t in translation["source_tokens"] if t["word"] >= 0][0] == 0
        assert all("truncated" in h and "attention" in h for h in translation["hypotheses"])


def test_heatmap(running: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "attention.png"
    assert main(["translate", TEXT, "--heatmap", str(path), *_target(running)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "heatmap written" in capsys.readouterr().err


@pytest.mark.parametrize("folder", [".", "plots", "plots/", "plots.d"])
def test_a_heatmap_path_that_names_a_folder_is_refused_in_one_line(folder: str, running: RunningServer,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # "." has no name to number: with several texts, its out-1.png, out-2.png cannot be made from it. A folder that
    # has a name is refused as "." is, with one text and with several: several texts wrote plots-1.png and
    # plots-2.png beside it, and plots.d was refused for its extension ("Format 'd' is not supported").
    monkeypatch.chdir(tmp_path)
    Path(folder).mkdir(exist_ok=True)
    for texts in ([TEXT], [TEXT, "Guten Morgen."]):
        with pytest.raises(SystemExit) as stopped:
            main(["translate", *texts, "--heatmap", folder, *_target(running)])
        assert stopped.value.code == f"attn: cannot write {Path(folder)}: Is a directory"
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


def test_models(running: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", *_target(running)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["MODEL", "VERSION", "FAMILY"]
    assert row.split()[:4] == ["tiny-de-en", "1", "translation", "de→en"] and row.endswith("*")


def test_errors_are_reported_with_their_code(running: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", "   ", *_target(running)]) == 1
    assert capsys.readouterr().err.strip() == "attn: INVALID_ARGUMENT: texts[0] is empty or only whitespace"


@pytest.mark.parametrize(("argv", "message"), [
    (["translate", "Hallo", "--beam", "-1"], "argument --beam: -1 is not between 0 and 4294967295"),
    (["translate", "Hallo", "--max-output-tokens", "5000000000"], "--max-output-tokens: 5000000000 is not between"),
    (["translate", "Hallo", "--attention-head", str(-(2**31) - 1)], "--attention-head: -2147483649 is not between"),
    (["caption", "x.png", "--nbest", "-2"], "argument --nbest: -2 is not between"),
    (["batch", "in.txt", "-o", "out.jsonl", "--beam", "-1"], "argument --beam: -1 is not between"),
    # An argument that is not UTF-8 reaches Python with its bytes escaped (PEP 383): no request can hold it.
    (["translate", "Hallo \udcff Welt"], "argument texts: b'Hallo \\xff Welt' is not UTF-8 text"),
    (["translate", "Hallo", "--model", "m\udcff"], "argument --model: b'm\\xff' is not UTF-8 text"),
    # A deadline gRPC takes as passed before the call starts: it would answer DEADLINE_EXCEEDED, blaming the server.
    (["models", "--timeout", "0"], "argument --timeout: 0 is not a number of seconds above 0"),
    (["health", "--timeout", "-5"], "argument --timeout: -5 is not a number of seconds above 0"),
    (["translate", "Hallo", "--timeout", "nan"], "argument --timeout: nan is not a number of seconds above 0"),
    (["caption", "x.png", "--timeout", "inf"], "argument --timeout: inf is not a number of seconds above 0"),
    (["models", "--timeout", "1e10"], "--timeout: 1e10 is not a number of seconds above 0 and at most 1000000000"),
    (["batch", "in.txt", "-o", "out.jsonl", "--timeout", "0"], "argument --timeout: 0 is not a number of seconds"),
    # Negative numbers argparse took for options of their own ("argument --timeout: expected one argument").
    (["models", "--timeout", "-inf"], "argument --timeout: -inf is not a number of seconds above 0"),
    (["health", "--timeout", "-1e3"], "argument --timeout: -1e3 is not a number of seconds above 0"),
    # Options that do not go together (exit 1 before, as a failed call).
    (["translate", "Hallo", "--heatmap", "h.png", "--attention", "words"], "--heatmap needs --attention full"),
    (["caption", "x.png", "--overlay", "o.png", "--attention", "none"], "--overlay needs --attention full"),
])
def test_options_a_request_cannot_hold_are_usage_errors(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:  # before any channel: no server needed
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_health(running: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", *_target(running)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


@pytest.mark.parametrize("command", [["models", "--json"], ["translate", TEXT], ["health"]])
def test_a_reader_that_closed_the_pipe_ends_the_command_without_a_traceback(running: RunningServer,
                                                                            command: list[str]) -> None:
    # `attn models --json | head -c 100`: the read end is closed before attn prints (here: before it starts).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run([sys.executable, "-m", "client.cli", *command, *_target(running)],
                                  stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert finished.stderr == ""
    assert finished.returncode == 141  # as a shell reports a program ended by SIGPIPE


@contextlib.contextmanager
def _interruptible_children() -> Iterator[None]:
    """Children started meanwhile take SIGINT as a terminal's Ctrl-C finds it. A shell's background job (as CI runs
    the tests) ignores SIGINT, and a child inherits an ignored signal; one handled here is reset to its default in
    the child. Set here rather than in a ``preexec_fn``: Python run between fork and exec, in a process whose gRPC
    threads may hold a lock at the fork, can hang the child before it ever runs the command."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("command", [["models"], ["translate", TEXT], ["health"]])
def test_ctrl_c_ends_the_command_with_one_line_and_status_130(command: list[str]) -> None:
    # A server that accepts the connection and never answers: the call waits until Ctrl-C.
    with socket.create_server(("127.0.0.1", 0)) as silent, _interruptible_children():
        silent.settimeout(60)
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", *command, "--target", f"127.0.0.1:{silent.getsockname()[1]}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = silent.accept()  # the call has started
        with connection:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", "attn: interrupted\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["models", "--tls-cert", "me.pem"], "--tls-cert and --tls-key go together"),
    (["translate", "Hallo", "--tls-key", "me.key"], "--tls-cert and --tls-key go together"),
    (["batch", "in.txt", "-o", "out.jsonl", "--tls-ca", "ca.pem", "--tls-cert", "me.pem"],
     "--tls-cert and --tls-key go together"),
    # Targets gRPC would fail on only after its resolver or connection did (with its own log lines), or wrap around:
    # port 99999 was port 34463.
    (["models", "--target", "127.0.0.1:99999"], "--target '127.0.0.1:99999': the port must be a number from 1 to"),
    (["health", "--target", "[::1]:0"], "--target '[::1]:0': the port must be a number from 1 to 65535"),
    (["translate", "Hallo", "--target", "dns:///localhost:65536"], "--target 'dns:///localhost:65536': the port must"),
    (["batch", "in.txt", "-o", "out.jsonl", "--target", "attention:123456"], "--target 'attention:123456': the port"),
    (["models", "--target", "localhost:abc"], "--target 'localhost:abc': the port must be a number from 1 to 65535"),
    (["models", "--target", "localhost:-1"], "--target 'localhost:-1': the port must be a number from 1 to 65535"),
    (["models", "--target", "localhost:50051/"], "--target 'localhost:50051/': the port must be a number from 1 to"),
    (["models", "--target", "localhost:"], "--target 'localhost:': no port after the ':'"),
    (["models", "--target", ""], "--target '': no server named"),
    (["models", "--target", " "], "--target ' ': no server named"),
    (["models", "--target", ":50051"], "--target ':50051': no host before the port"),
    (["models", "--target", "[]:50051"], "--target '[]:50051': no host before the port"),
    (["models", "--target", "[::1:50051"], "--target '[::1:50051': neither host:port nor [IPv6 address]:port"),
    (["models", "--target", "localhost:50051:1"], "--target 'localhost:50051:1': neither host:port nor an IPv6"),
    (["models", "--target", "http://localhost:50051"], "--target 'http://localhost:50051': gRPC knows no http://"),
    (["models", "--target", "dns://localhost:50051"], "--target 'dns://localhost:50051': dns:// is followed by the "
                                                      "address of a DNS server, and no host: write dns:///HOST:PORT"),
    (["models", "--target", "unix:"], "--target 'unix:': no address after unix:"),
])
def test_connection_options_no_channel_can_be_made_of_are_usage_errors_in_one_line(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:  # before any channel: no server needed
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"attn: {message}") and err.count("\n") == 1, err


def test_a_target_from_the_environment_is_named_so_in_its_refusal(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ATTN_TARGET", "localhost:99999")
    with pytest.raises(SystemExit) as stopped:
        main(["models"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "attn: ATTN_TARGET 'localhost:99999': the port must be a number from 1 to 65535\n"
    monkeypatch.setenv("ATTN_TARGET", "")  # set, and empty: not the default
    with pytest.raises(SystemExit) as stopped:
        main(["health"])
    assert stopped.value.code == 2 and capsys.readouterr().err == "attn: ATTN_TARGET '': no server named\n"


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "localhost:{port}", "dns:///127.0.0.1:{port}",
                                  "dns:localhost:{port}", "dns:///localhost:{port}", "ipv4:127.0.0.1:{port}"])
def test_targets_in_the_forms_grpc_takes_reach_the_server(form: str, running: RunningServer,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ATTN_TARGET", raising=False)
    assert main(["health", "--target", form.format(port=running.port)]) == 0
    assert capsys.readouterr().out == "SERVING\n"


@pytest.mark.parametrize("target", [
    "attention:50051", "[::1]:50051", "[fe80::1%eth0]:443", "attention", "::1", "[::1]", "fe80::1%eth0",
    "unix:/run/attn.sock", "unix:///run/attn.sock", "unix-abstract:attn", "vsock:3:50051", "ipv6:[::1]:50051",
    "ipv4:10.0.0.1:50051,10.0.0.2:50051", "dns://8.8.8.8/attention.example.com:443", "dns:attention",
    "xds:///attention", "google-c2p:///attention",
])
def test_targets_in_the_forms_grpc_takes_are_not_refused(target: str) -> None:
    # Forms no test server answers on: unix sockets, other schemes, hosts without a port (gRPC's 443).
    assert connection.target_problem(target) is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(models_dir: Path, pki: Pki) -> Iterator[RunningServer]:
    server = RunningServer(settings(models_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)),
                           load=False)
    yield server
    server.close()


def _attn(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``attn`` in a process of its own: what gRPC's C core writes to stderr is that process's, and its streams are
    the ones ``env`` makes (read back in that encoding)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    encoding = (env or {}).get("PYTHONIOENCODING", "utf-8")
    return subprocess.run([sys.executable, "-m", "client.cli", *argv, "--timeout", "20"], capture_output=True,
                          encoding=encoding, timeout=120, env={**environ, **(env or {})})


def test_a_tls_mismatch_is_reported_in_the_clis_lines_only(running: RunningServer, tls_server: RunningServer,
                                                          pki: Pki) -> None:
    # gRPC's C core logged the failed handshake ("I1205 ... ssl_transport_security.cc:2563] Handshake failed with
    # error SSL_ERROR_SSL ...") to stderr before the CLI's own lines.
    tls_to_plaintext = _attn("health", "--target", f"localhost:{running.port}", "--tls-ca", str(pki.ca))
    plaintext_to_tls = _attn("models", "--target", f"127.0.0.1:{tls_server.port}")
    for finished in (tls_to_plaintext, plaintext_to_tls):
        assert finished.returncode == 1 and finished.stdout == ""
        lines = finished.stderr.splitlines()
        assert lines[0].startswith("attn: UNAVAILABLE: ") and all(line.startswith("attn: ") for line in lines), \
            finished.stderr
    assert "add --tls-ca PEM" in plaintext_to_tls.stderr


def test_grpc_verbosity_set_by_the_user_still_shows_grpcs_log(running: RunningServer, pki: Pki) -> None:
    finished = _attn("health", "--target", f"localhost:{running.port}", "--tls-ca", str(pki.ca),
                     env={"GRPC_VERBOSITY": "INFO"})
    assert finished.returncode == 1 and "Handshake failed" in finished.stderr
    assert finished.stderr.splitlines()[-1].startswith("attn: UNAVAILABLE: ")


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "latin-1"},
                                 {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}])
def test_output_the_terminal_cannot_encode_is_escaped_not_a_traceback(env: dict[str, str],
                                                                      running: RunningServer) -> None:
    # "←" of the alignment, "→" of a models row, "▁" of a token's piece: a UnicodeEncodeError traceback ended the
    # command (the answer half printed).
    target = _target(running)
    view = _attn("translate", TEXT, "--beam", "1", *target, env=env)
    assert (view.returncode, view.stderr) == (0, ""), view.stderr
    assert "  alignment (target word \\u2190 source words" in view.stdout
    models = _attn("models", *target, env=env)
    assert (models.returncode, models.stderr) == (0, "") and " de\\u2192en " in models.stdout, models.stderr
    # --json stays JSON: a character the stream cannot take becomes a JSON escape, \\uXXXX (a pair above U+FFFF).
    texts = [TEXT] if "LC_ALL" in env else [TEXT, "Schöne Grüße 😀"]
    answer = _attn("translate", *texts, "--beam", "1", "--json", *target, env=env)
    assert answer.returncode == 0 and answer.stdout.isascii() != (env.get("PYTHONIOENCODING") == "latin-1")
    assert json.loads(answer.stdout) == json.loads(_attn("translate", *texts, "--beam", "1", "--json", *target).stdout)


def test_utf8_arguments_in_an_ascii_locale_are_the_texts_they_spell(running: RunningServer) -> None:
    # Without Python's UTF-8 mode a C locale decodes argv as ASCII, with each other byte escaped (PEP 383): the
    # UTF-8 text "Schöne Grüße" was refused as "b'Sch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe' is not UTF-8 text".
    env = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    view = _attn("translate", "Schöne Grüße", "--beam", "1", *_target(running), env=env)
    assert (view.returncode, view.stderr) == (0, ""), view.stderr
    assert view.stdout.splitlines()[0] == "Sch\\u00f6ne Gr\\u00fc\\u00dfe"


@pytest.mark.parametrize(("argv", "value"), [
    (["translate", "Hallo", "--length-penalty", "-inf"], -math.inf),
    (["translate", "Hallo", "--length-penalty", "-Infinity", "--beam", "2"], -math.inf),
    (["translate", "Hallo", "--length-penalty", "-1e3"], -1000.0),
    (["translate", "--length-penalty", "-1E-3", "Hallo"], -0.001),
    (["caption", "x.png", "--length-penalty", "-.5"], -0.5),
    (["caption", "x.png", "--length-penalty", "-2"], -2.0),
    (["batch", "in.txt", "-o", "out.jsonl", "--length-penalty", "-1_000.5"], -1000.5),
])
def test_a_negative_number_is_the_value_of_the_option_before_it(argv: list[str], value: float) -> None:
    # argparse took -inf and -1e3 (unlike -1 and -.5) for options of their own: "argument --length-penalty: expected
    # one argument", and only --length-penalty=-inf worked.
    assert parser().parse_args(argv).length_penalty == value


def test_a_negative_length_penalty_reaches_the_server(running: RunningServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", "Hallo", "--length-penalty", "-1e3", *_target(running)]) == 1
    assert capsys.readouterr().err.startswith("attn: INVALID_ARGUMENT: length_penalty -1000.0 must be a finite number")


def test_an_option_that_does_not_exist_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["models", "-x"], ["models", "-infinite"], ["translate", "Hallo", "--beam", "-b"]):
        with pytest.raises(SystemExit) as stopped:
            parser().parse_args(argv)
        assert stopped.value.code == 2
    assert "unrecognized arguments: -x" in capsys.readouterr().err
