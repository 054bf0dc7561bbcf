"""`fewstep serve` from the command line: it starts, serves and stops; startup mistakes are one-line errors."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from fewstep.cli import main


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(capsys, *argv):
    code = main(["serve", *map(str, argv)])
    return code, capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--lora-dir", "--host", "--port", "--api-key", "--max-batch", "--max-wait-ms",
                 "--queue-size", "--timeout", "--max-size", "--max-images", "--max-steps", "--max-body-mb"):
        assert flag in out


@pytest.mark.parametrize("argv,message", [
    (["--lora-dir", "/nonexistent/loras"], "--lora-dir /nonexistent/loras is not a folder"),
    (["--max-batch", "0"], "--max-batch must be a whole number >= 1"),
    (["--queue-size", "2", "--max-images", "4"], "--queue-size must be >= --max-images"),
    (["--api-key", "short"], "--api-key must be at least 8"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or folder"),
    (["--model-memory", "0"], "--model-memory must be a number of GiB > 0"),
])
def test_startup_mistakes_are_one_line_errors(capsys, argv, message):
    code, err = serve(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("fewstep: error: ") and message in err


def test_a_busy_port_fails_before_the_model_loads(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.monotonic()
        code, err = serve(capsys, "--port", busy.getsockname()[1])
    assert code == 2 and "is in use: pick another with --port" in err and time.monotonic() - t0 < 5


def test_fewstep_serve_starts_serves_and_stops(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--dtype", "fp32", "--max-wait-ms", "5", "--lora-dir", str(tmp_path), "--no-warmup"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 32, "height": 32, "seed": 1},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    err = proc.stderr.read()
    assert code == 0, err
    assert f"serving shapes-teacher-v1 (cpu, float32) on http://127.0.0.1:{port}/" in err
    # the port answered before the model was in, and the load said what it was doing
    assert err.index(f"listening on http://127.0.0.1:{port}/") < err.index("loading model shapes-teacher-v1")
    assert err.index("loading model shapes-teacher-v1") < err.index("serving shapes-teacher-v1")
    assert err.rstrip().endswith("fewstep: stopped")


def test_a_model_that_cannot_load_ends_the_server_with_a_one_line_error(capsys, tmp_path):
    # the port is bound and announced first; the load fails in the background and the server exits with its error
    code, err = serve(capsys, "--model", tmp_path, "--port", 0, "--device", "cpu", "--dtype", "fp32")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("fewstep: listening on http://127.0.0.1:")
    assert lines[-1].startswith("fewstep: error: ") and "model_index.json" in lines[-1]
    assert "Traceback" not in err
