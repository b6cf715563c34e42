"""`moerun serve` under requests that used to take it down or get a silent wrong answer: the API key before the body,
bounded bodies and prompts, incremental detokenization, translation limits, a scheduler fault, unsupported fields,
shutdown, the CLI's bind, the error shape of unknown routes, the chat template's sandbox. One server per module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import CHAT_TEMPLATE, PROMPTS, free_port, metric, wait_for

from moerun.runtime import MoEModel
from moerun.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def model(tiny_moe_converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("limits") / "tiny-moe"
    shutil.copytree(tiny_moe_converted, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return MoEModel.load(out, provider="cpu", threads=1)


@contextlib.contextmanager
def serving(model, **settings):
    """As `moerun serve` serves it, in a thread; yields (base url, uvicorn server)."""
    from moerun.serve.launch import make_server

    server = make_server(create_app(model, ServeSettings(**settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 30), "the server did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def keyed(model):
    with serving(model, api_key="k3y", max_body_bytes=2**20, max_batch=4) as (base, server):
        yield base, server


def raw(base: str, head: str, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Sends a request's head (and ``body``) on a socket; what the server answers within ``wait`` seconds."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head.encode() + body)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/translations"),
          ("GET", "/v1/models")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_protected_route_checks_the_key_before_reading_the_body(keyed, method, path):
    base, _ = keyed
    for auth in ("", "Authorization: Bearer wrong\r\n"):
        # a 200 MB body announced and never sent: the answer must come from the headers alone
        answer = raw(base, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                           f"Content-Length: {200 * 2**20}\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b'"invalid_api_key"' in answer
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # probes need no key


def test_a_body_over_the_limit_is_413_before_it_is_parsed(keyed):
    base, _ = keyed
    auth = "Authorization: Bearer k3y\r\n"
    answer = raw(base, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {200 * 2**20}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # no Content-Length (chunked): counted as it arrives, refused once past the limit
    chunks = (b'{"prompt": "' + b"a" * 2**16 for _ in range(40))
    r = httpx.post(f"{base}/v1/completions", content=chunks, headers={"Authorization": "Bearer k3y"}, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                    headers={"Authorization": "Bearer k3y"}, timeout=30)
    assert ok.status_code == 200, ok.text


def _health_latencies(base: str, stop: threading.Event) -> list[float]:
    out = []
    while not stop.is_set():
        start = time.monotonic()
        httpx.get(f"{base}/health", timeout=30)
        out.append(time.monotonic() - start)
        time.sleep(0.05)
    return out


def test_a_huge_prompt_leaves_health_answering(model, monkeypatch):
    """A 20 MB prompt is refused by the body limit, a 4 MB one by its length in characters, both before they are
    tokenized; a prompt that takes long to tokenize is tokenized off the event loop: /health answers within 1 s all
    along."""
    with serving(model) as (base, _):
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            latencies = pool.submit(_health_latencies, base, stop)
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi " * 7_000_000, "max_tokens": 1},
                           timeout=120)
            assert r.status_code == 413, r.text[:300]
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi " * 1_400_000, "max_tokens": 1},
                           timeout=120)
            assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text[:300]
            encode = model.tokenizer.encode

            def slow_encode(*args, **kwargs):
                time.sleep(3)
                return encode(*args, **kwargs)

            monkeypatch.setattr(model.tokenizer, "encode", slow_encode)
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
            assert r.status_code == 200
            stop.set()
            assert max(latencies.result()) < 1.0, latencies.result()


def test_streamed_text_is_decoded_incrementally_and_stop_strings_are_bounded(model, monkeypatch):
    """No token re-decodes the sequence (the tokenizer's decode is never called while streaming), the text equals the
    whole decode, and stop strings are found across token boundaries with at most the stop's length held back."""
    from moerun.serve.text import IncrementalText

    tok = model.tokenizer
    ids = model.generate_ids([tok.encode(PROMPTS[0])], 60)[0]
    whole = tok.decode(ids)
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a: calls.append(a) or decode(*a))
    text = IncrementalText(tok, [])
    assert "".join([text.add(i) for i in ids] + [text.flush()]) == whole
    stop = whole[len(whole) // 2: len(whole) // 2 + 5]
    text = IncrementalText(tok, ["zzzzzzzzzz", stop])
    pieces = []
    for i in ids:
        pieces.append(text.add(i))
        assert len(text.pending) <= len("zzzzzzzzzz") - 1 + 16  # what may still begin a stop, plus one piece
        if text.stopped:
            break
    assert "".join(pieces) == whole[: whole.index(stop)] and text.stopped
    assert calls == []


def test_clean_up_tokenizer_streams_as_it_decodes(t5_tokenizer, tmp_path):
    """A tokenizer that cleans up spaces before punctuation (transformers' clean_up_tokenization_spaces): the pieces
    streamed equal its whole decode."""
    import numpy as np

    from moerun.runtime.tokenizer import Tokenizer

    t5_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    tok = Tokenizer(tmp_path)
    assert tok._clean_up
    rng = np.random.default_rng(0)
    texts = ["Hello , world . It 's fine , isn 't it ?", "a ' b ' c ! d ?"]
    for ids in [tok.encode(t) for t in texts] + [rng.integers(0, 300, 40).tolist() for _ in range(20)]:
        stream = tok.text_stream()
        assert "".join([stream.step(i) for i in ids] + [stream.flush()]) == tok.decode(ids), ids


def test_translation_max_tokens_timeout_and_stop(seq2seq_converted, tmp_path):
    from moerun.bench import word_level_tokenizer
    from moerun.runtime.errors import RequestCancelledError

    model_dir = tmp_path / "switch"
    shutil.copytree(seq2seq_converted["switch"], model_dir)
    word_level_tokenizer(120).save_pretrained(model_dir)
    model = MoEModel.load(model_dir, provider="cpu", threads=1)
    with pytest.raises(RequestCancelledError):
        model.translate("t5 t17 t33 t1", max_new_tokens=12, should_stop=lambda: True)
    with serving(model) as (base, _):
        r = httpx.post(f"{base}/v1/translations", json={"text": "t5 t1", "max_tokens": 12_000_000}, timeout=30)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/translations", json={"text": "t5 t1", "max_tokens": 4},
                          timeout=30).status_code == 200
    with serving(model, timeout=0.001) as (base, _):
        r = httpx.post(f"{base}/v1/translations", json={"text": "t5 t17 t33 t1", "max_tokens": 50, "beams": 4},
                       timeout=30)
        assert r.status_code == 504 and "longer than" in r.json()["error"]["message"]


class _Fatal(BaseException):
    """Nothing catches it: the scheduler thread dies."""


def test_a_scheduler_fault_fails_its_requests_and_health_says_so(model, monkeypatch):
    with serving(model, max_batch=2, timeout=2.0) as (base, server):
        scheduler = server.config.app.state.server.scheduler
        # a fault outside the model's runs: the running requests fail, the loop goes on
        monkeypatch.setattr(scheduler, "_prefill_groups", lambda slots: 1 / 0)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "internal error" in r.json()["error"]["message"]
        monkeypatch.undo()
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                          timeout=30).status_code == 200
        # a decode step that never returns: the app times the request out on its own
        release = threading.Event()
        decode = scheduler.engine.decode
        monkeypatch.setattr(scheduler.engine, "decode", lambda tokens: release.wait(30) and decode(tokens))
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 504 and time.monotonic() - start < 10
        release.set()
        monkeypatch.undo()
        # the thread dies: the running request is told, /health is not 200, new requests get 503
        monkeypatch.setattr(scheduler.engine, "decode", lambda tokens: (_ for _ in ()).throw(_Fatal("boom")))
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "scheduler thread stopped" in r.json()["error"]["message"], r.text
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503 and "boom" in health.json()["reason"]
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503 and "boom" in r.json()["error"]["message"]


UNSUPPORTED = [("completions", "suffix", "x"), ("completions", "echo", True), ("completions", "best_of", 3),
               ("completions", "frobnicate", 1), ("chat", "audio", {"voice": "alloy", "format": "wav"}),
               ("chat", "modalities", ["text", "audio"]), ("chat", "functions", [{"name": "f"}]),
               ("chat", "function_call", "auto"), ("chat", "prediction", {"type": "content", "content": "x"}),
               ("chat", "reasoning_effort", "low"), ("chat", "web_search_options", {}), ("chat", "store", True),
               ("chat", "metadata", {"a": "b"}), ("chat", "service_tier", "auto")]


def test_each_unsupported_field_is_refused_by_name(keyed):
    base, _ = keyed
    auth = {"Authorization": "Bearer k3y"}
    for endpoint, field, value in UNSUPPORTED:
        body = {"prompt": "Hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
        path = "completions" if endpoint == "completions" else "chat/completions"
        r = httpx.post(f"{base}/v1/{path}", json={**body, field: value, "max_tokens": 2}, headers=auth, timeout=30)
        assert r.status_code == 400, (field, r.text)
        assert field in r.json()["error"]["message"] and r.json()["error"]["param"] == field, r.text
    # the model may be left out: one model is served
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tiny-moe"
    r = httpx.post(f"{base}/v1/chat/completions", json={"max_completion_tokens": 5, "temperature": 0,
                                                        "messages": [{"role": "user", "content": "Hi"}]},
                   headers=auth, timeout=30)
    assert r.json()["usage"]["completion_tokens"] <= 5, r.text


def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(keyed):
    base, _ = keyed
    auth = {"Authorization": "Bearer k3y"}
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/v1/nothing", 404),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{base}{path}", headers=auth, timeout=10)
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and r.json()["error"]["message"], r.text


def test_shutdown_answers_running_and_new_requests_with_503(model):
    with serving(model, max_batch=2) as (base, server):
        results = {}

        def long_request():
            results["r"] = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 400,
                                                                      "temperature": 0}, timeout=60)

        thread = threading.Thread(target=long_request)
        thread.start()
        assert wait_for(lambda: metric(base, "moerun_running_batch_size") == 1, 30)
        with httpx.Client(base_url=base, timeout=30) as client:  # a kept-alive connection sends after the signal
            assert client.get("/health").status_code == 200
            server.should_exit = True
            thread.join(30)
            assert results["r"].status_code == 503, results["r"].text
            assert "shutting down" in results["r"].json()["error"]["message"]
            with contextlib.suppress(httpx.TransportError):  # or the connection is already closed
                late = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                assert late.status_code == 503


def test_chat_template_sandbox_refuses_reaching_python_internals(tmp_path):
    from moerun.runtime.errors import RequestError
    from moerun.serve.chat import ChatTemplate

    for source in ("{{ raise_exception.__globals__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ messages.__class__.__init__.__globals__['sys'] }}"):
        with pytest.raises(RequestError, match="unsafe|not safely callable"):
            ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])


def _cli(*args, env=None, **kwargs):
    exe = Path(sys.executable).with_name("moerun")
    return subprocess.Popen([str(exe), "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def test_cli_on_a_port_in_use_or_an_unknown_host_says_so_in_one_line(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, words in ((["--port", str(port)], "in use"), (["--host", "no-such-host.invalid"], "resolve")):
            proc = _cli(str(model.directory), *args, "--provider", "cpu")
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 1, (out, err)
            assert len(err.strip().splitlines()) == 1 and words in err and "serving" not in (out + err), err


def test_cli_takes_the_api_key_from_the_environment(model):
    port = free_port()
    proc = _cli(str(model.directory), "--port", str(port), "--provider", "cpu", "--threads", "1",
                env={"MOERUN_API_KEY": "from-env"})
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
        assert wait_for(up, 60), proc.stderr.read() if proc.poll() is not None else "no /health"
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer from-env"},
                          timeout=30).status_code == 200
        assert "from-env" not in " ".join(proc.args)
    finally:
        proc.terminate()
        proc.wait(20)
