"""`moerun serve`: the OpenAI-compatible server on loopback. Oracles: MoEModel.generate_ids on each request alone,
transformers' apply_chat_template, the unmodified `openai` client, and the KV buffers' own bytes."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from moerun.runtime import MoEModel
from moerun.serve import ServeSettings, create_app

# A Mistral-style template: special tokens, a loop, raise_exception, the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS] {{ message['content'] | trim }} [/SYS]\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Answer:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "  You tell stories.  "}, {"role": "user", "content": "Once upon a time"},
            {"role": "assistant", "content": "there was a king."}, {"role": "user", "content": "Go on"}]
PROMPTS = ["Once upon a time", "The king said", "In the morning the little", "Hello", "She looked at the",
           "There was once a", "The old man and", "A", "They went to the forest and", "It was a dark",
           "The children played", "When the sun", "He opened the door", "Far away", "The queen", "One day, a small"]


@pytest.fixture(scope="module")
def model_dir(tiny_moe_converted, tmp_path_factory) -> Path:
    """The trained fixture converted (fused attention, a tokenizer), copied with a chat template written in."""
    out = tmp_path_factory.mktemp("serve") / "tiny-moe"
    shutil.copytree(tiny_moe_converted, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=2))
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    m = MoEModel.load(model_dir, provider="cpu", threads=2)
    assert m.manifest.fused_attention
    return m


@contextlib.contextmanager
def serving(model, **settings):
    """uvicorn in a thread on 127.0.0.1, a free port, as `moerun serve` runs it; yields (base url, app)."""
    from moerun.serve.launch import make_server

    app = create_app(model, ServeSettings(**settings))
    server = make_server(app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)


def metric(base: str, name: str, labels: dict | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def complete(base: str, name: str, prompt, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": prompt, **body}, timeout=60)


def test_serving_imports_no_torch():
    code = ("import sys, moerun.serve.app, moerun.serve.ray_app, moerun.serve.launch; "
            "bad = [m for m in ('torch', 'transformers', 'moerun.converter') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_slot_length_defaults_to_the_model_capped_at_4096(model, monkeypatch):
    """Every slot's KV cache is allocated at start: a 32k-position model must not reserve 32k positions per slot
    unless asked (Mixtral-8x7B: 4.3 GB per slot in fp16)."""
    from moerun.serve.scheduler import Scheduler

    buffers = {}
    for positions, asked, expected in ((512, None, 512), (32768, None, 4096), (32768, 300, 300)):
        monkeypatch.setattr(model.manifest, "max_positions", positions)
        scheduler = Scheduler(model, max_batch=1, max_queue=1, max_len=asked)
        try:
            assert scheduler.max_len == expected
            buffers[positions, asked] = scheduler.engine.buffers[0].shape()[2]
        finally:
            scheduler.close()
    assert buffers == {(512, None): 512, (32768, None): 4096, (32768, 300): 300}


def test_prefill_into_slot_leaves_other_slots_untouched(model):
    from moerun.serve.engine import SlotEngine

    engine = SlotEngine(model.runner, max_batch=5, max_len=32, pad_token_id=model.pad_token_id)
    encode = model.tokenizer.encode
    engine.prefill(0, [encode(PROMPTS[0])], [4])
    engine.prefill(2, [encode(PROMPTS[1])], [4])
    before = [buf.numpy().copy() for buf in engine.buffers]
    engine.prefill(1, [encode(PROMPTS[2])], [4])
    for old, new in zip(before, (buf.numpy() for buf in engine.buffers)):
        np.testing.assert_array_equal(new[[0, 2, 3, 4]], old[[0, 2, 3, 4]])
        assert not np.array_equal(new[1], old[1])
    before = [buf.numpy().copy() for buf in engine.buffers]
    engine.prefill(3, [encode(PROMPTS[3]), encode(PROMPTS[4])], [4, 4])  # two joining together, right-padded
    for old, new in zip(before, (buf.numpy() for buf in engine.buffers)):
        np.testing.assert_array_equal(new[:3], old[:3])
        assert not np.array_equal(new[3], old[3]) and not np.array_equal(new[4], old[4])
    # A decode step writes each busy row at its own length only.
    lengths = {0: len(encode(PROMPTS[0])), 2: len(encode(PROMPTS[1]))}
    before = [buf.numpy().copy() for buf in engine.buffers]
    engine.decode({0: 5, 1: 6, 2: 7, 3: 8, 4: 9})
    for old, new in zip(before, (buf.numpy() for buf in engine.buffers)):
        for row, n in lengths.items():
            np.testing.assert_array_equal(new[row, :, :n], old[row, :, :n])
            np.testing.assert_array_equal(new[row, :, n + 1:], old[row, :, n + 1:])
            assert not np.array_equal(new[row, :, n], old[row, :, n])


def test_sixteen_concurrent_clients_match_each_request_alone(model):
    name = model.directory.name
    encode = model.tokenizer.encode
    requests = [dict(prompt=p, max_tokens=6 + 3 * (i % 5), temperature=0) for i, p in enumerate(PROMPTS)]
    requests[3] = dict(prompt=PROMPTS[3], max_tokens=12, temperature=0.9, top_p=0.8, seed=7)  # sampling, seeded
    requests[9] = dict(prompt=[1, 57, 300, 9], max_tokens=9, temperature=1.0, seed=123)  # token ids

    def alone(r):
        ids = encode(r["prompt"]) if isinstance(r["prompt"], str) else r["prompt"]
        if r["temperature"] == 0:
            return model.generate_ids([ids], r["max_tokens"])[0]
        return model.generate_ids([ids], r["max_tokens"], do_sample=True, temperature=r["temperature"],
                                  top_p=r.get("top_p", 1.0), seed=r["seed"])[0]

    expected = [alone(r) for r in requests]
    with serving(model, max_batch=8, max_queue=16) as (base, _):
        start = threading.Barrier(len(requests))

        def send(r):
            start.wait()
            return complete(base, name, **r)

        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(send, requests))
        for r, response, want in zip(requests, responses, expected):
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            assert choice["token_ids"] == want, r
            assert choice["text"] == model.tokenizer.decode(want)
            assert response.json()["usage"]["completion_tokens"] == len(want)
            assert choice["finish_reason"] == ("stop" if want[-1] in model.manifest.eos_token_id else "length")
        steps = metric(base, "moerun_batch_size_count")
        tokens_in_steps = metric(base, "moerun_batch_size_sum")
        assert tokens_in_steps / steps > 2, "the decode steps did not batch the requests"
        assert metric(base, "moerun_batch_size_bucket", {"le": "8.0"}) > metric(base, "moerun_batch_size_bucket",
                                                                                 {"le": "4.0"})
        assert metric(base, "moerun_running_batch_size") == 0
        # some requests joined together: prefilled in one run into consecutive slots
        assert metric(base, "moerun_prefill_batch_size_count") < len(requests)
        assert metric(base, "moerun_prefill_batch_size_sum") == len(requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_overload_gets_503_with_retry_after_then_serves(model_dir):
    port = free_port()
    exe = Path(sys.executable).with_name("moerun")
    proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--port", str(port), "--max-batch", "1",
                             "--max-queue", "2", "--threads", "1", "--provider", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
        assert wait_for(up, 60), proc.stderr.read() if proc.poll() is not None else "no /health"
        burst = threading.Barrier(12)

        def send(_):
            burst.wait()
            return complete(base, model_dir.name, PROMPTS[0], max_tokens=60, temperature=0)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(send, range(12)))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "waiting" in r.json()["error"]["message"]
        assert metric(base, "moerun_rejected_requests_total", {"reason": "queue_full"}) == codes.count(503)
        after = complete(base, model_dir.name, PROMPTS[1], max_tokens=4, temperature=0)
        assert after.status_code == 200 and after.json()["choices"][0]["token_ids"]
    finally:
        proc.terminate()
        proc.wait(20)


def test_cli_without_the_serve_extra_says_which_extra():
    code = ("import sys; sys.modules['fastapi'] = None; from moerun.cli import main; "
            "main(['serve', 'nowhere'], prog_name='moerun')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["Error: moerun serve needs the serve extra (fastapi is missing): "
                                             "pip install 'moerun[serve]'"]


def test_disconnect_frees_the_slot(model):
    name = model.directory.name
    with serving(model, max_batch=4) as (base, _):
        with httpx.Client(timeout=30) as client:
            body = {"model": name, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
            with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                assert metric(base, "moerun_running_batch_size") == 1
            # the stream closed after its first token: the slot is freed within a step or two
        assert wait_for(lambda: metric(base, "moerun_running_batch_size") == 0)
        assert metric(base, "moerun_generated_tokens_total") < 400
        # a non-streaming client that gives up: it closes its connection while its request is decoding (a raw
        # socket: no client-side timeout racing the server's speed)
        complete_body = json.dumps({"model": name, "prompt": PROMPTS[1], "max_tokens": 450, "temperature": 0})
        host, port = base.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(complete_body)}\r\n\r\n{complete_body}".encode())
            assert wait_for(lambda: metric(base, "moerun_running_batch_size") == 1, seconds=30)
        assert wait_for(lambda: metric(base, "moerun_running_batch_size") == 0)
        assert metric(base, "moerun_generated_tokens_total") < 800
        assert complete(base, name, PROMPTS[2], max_tokens=3, temperature=0).status_code == 200


BAD = [  # (body, status, words in the message)
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "valid dictionary"),
    (b'{"max_tokens": 2}', 400, "prompt: Field required"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "does not exist"),
    ({"prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 10**9}, 400, "512 tokens"),
    ({"prompt": "Hi " * 600, "max_tokens": 1}, 400, "512 tokens"),
    ({"prompt": "Hi", "temperature": 7}, 400, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "Hi", "n": 0}, 400, "n"),
    ({"prompt": "Hi", "n": 3}, 400, "more than this server's 2 requests"),
    ({"prompt": "Hi", "seed": -1}, 400, "seed"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [5, 99999]}, 400, "token ids"),
    ({"prompt": ["one", "two"]}, 400, "one prompt"),
    ({"prompt": 42}, 400, "prompt"),
]


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(model):
    name = model.directory.name
    with serving(model, max_batch=2) as (base, _):
        for body, status, words in BAD:
            if isinstance(body, dict):
                body = {"model": name, **body}
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
            r = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"},
                           timeout=30)
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
            good = complete(base, name, PROMPTS[0], max_tokens=2, temperature=0)
            assert good.status_code == 200, good.text
        chat = httpx.post(f"{base}/v1/chat/completions", json={"model": name, "messages": [
            {"role": "robot", "content": "hi"}]}, timeout=30)
        assert chat.status_code == 400 and "messages.0.role" in chat.json()["error"]["message"], chat.text
        r = httpx.post(f"{base}/v1/translations", json={"model": name, "text": "hi"}, timeout=30)
        assert r.status_code == 400 and "decoder-only" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"] == name
    with serving(model, timeout=0.001) as (base, _):  # every request times out
        r = complete(base, name, PROMPTS[0], max_tokens=50, temperature=0)
        assert r.status_code == 504 and "longer than" in r.json()["error"]["message"]
        assert wait_for(lambda: metric(base, "moerun_running_batch_size") == 0)


def test_api_key(model):
    name = model.directory.name
    with serving(model, api_key="s3cret") as (base, _):
        body = {"model": name, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
        wrong = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        right = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"},
                           timeout=30)
        assert right.status_code == 200
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # probes need no key


def test_openai_client_completes_and_streams(model):
    import openai

    name = model.directory.name
    tok = model.tokenizer
    want = tok.decode(model.generate_ids([tok.encode(PROMPTS[0])], 12)[0])
    chat_ids = tok.encode(chat_template_text(model.directory), add_special_tokens=False)
    want_chat = tok.decode(model.generate_ids([chat_ids], 10)[0])
    with serving(model, api_key="k") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        done = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert done.choices[0].text == want and done.usage.completion_tokens == 12
        stream = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
        pieces = [c.choices[0].text for c in stream]
        assert "".join(pieces) == want and len(pieces) > 3
        chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == want_chat and chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens == len(chat_ids)
        chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_chat
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        # a stop string ends the text before it, streamed or not
        stop = want[3:6]
        cut = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == want[: want.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                             stop=stop, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want[: want.index(stop)]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x", max_tokens=2)


def chat_template_text(directory: Path) -> str:
    from moerun.serve.chat import load_chat_template

    return load_chat_template(directory).render(MESSAGES)


def test_chat_template_renders_as_transformers(model_dir):
    from transformers import AutoTokenizer

    from moerun.runtime.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    ours = chat_template_text(model_dir)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<s>[SYS] You tell stories. [/SYS]\n[INST]")
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert Tokenizer(model_dir).encode(ours, add_special_tokens=False) == list(ids)


def test_traced_attention_model_batches_requests_arriving_together(converted, monkeypatch):
    """Traced attention (its KV cache grows by concatenation, no slot rows): requests arriving together run as one
    left-padded batch, each still getting what it gets alone; a request that ends early rides along."""
    from moerun.serve import scheduler

    monkeypatch.setattr(scheduler, "JOIN_GAP", 0.5)  # a loaded machine must not split the four into groups
    monkeypatch.setattr(scheduler, "JOIN_WINDOW", 3.0)
    model = MoEModel.load(converted["k1_e4_h72"], provider="cpu", threads=2)  # head size 18: traced attention
    assert not model.manifest.fused_attention
    prompts = [[1, 20, 30, 40], [1, 7], [1, 100, 101, 102, 103, 104], [1, 3, 9]]
    lengths = [8, 3, 8, 5]
    expected = [model.generate_ids([p], n)[0] for p, n in zip(prompts, lengths)]
    with serving(model, max_batch=8) as (base, _):
        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health["batching"].startswith("static") and health["max_batch"] == 8
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda a: complete(base, "k1_e4_h72", a[0], max_tokens=a[1], temperature=0),
                                      zip(prompts, lengths)))
        assert [r.json()["choices"][0]["token_ids"] for r in responses] == expected
        assert metric(base, "moerun_prefill_batch_size_count") == 1  # one group of four
        assert metric(base, "moerun_batch_size_bucket", {"le": "1.0"}) < metric(base, "moerun_batch_size_count")
        no_text = complete(base, "k1_e4_h72", "text", max_tokens=2)
        assert no_text.status_code == 400 and "tokenizer" in no_text.json()["error"]["message"]


def test_copy_of_model_dir_without_tokenizer_config_has_no_chat(model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "tokenizer_config.json").unlink()
    model = MoEModel.load(plain, provider="cpu", threads=1)
    with serving(model) as (base, _):
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "plain", "messages": MESSAGES}, timeout=30)
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_translations_endpoint_answers_as_translate_alone(seq2seq_converted, tmp_path):
    from moerun.bench import word_level_tokenizer

    model_dir = tmp_path / "switch-onnx"
    shutil.copytree(seq2seq_converted["switch"], model_dir)
    word_level_tokenizer(120).save_pretrained(model_dir)  # words t0 .. t119, one id each
    model = MoEModel.load(model_dir, provider="cpu", threads=2)
    texts = ["t5 t17 t33 t1", "t40 t41 t42 t43 t44 t45 t1", "t9 t1", "t100 t3 t77 t60 t1"]
    expected = [model.translate(t, num_beams=1 + i % 2, max_new_tokens=12) for i, t in enumerate(texts)]
    assert len(set(expected)) > 1
    with serving(model) as (base, _):
        def send(i):
            body = {"model": "switch-onnx", "text": texts[i], "beams": 1 + i % 2, "max_tokens": 12}
            return httpx.post(f"{base}/v1/translations", json=body, timeout=60)

        with ThreadPoolExecutor(len(texts)) as pool:
            responses = list(pool.map(send, range(len(texts))))
        assert [r.json()["text"] for r in responses] == expected
        assert all(r.json()["usage"]["completion_tokens"] > 0 for r in responses)
        r = complete(base, "switch-onnx", "hello", max_tokens=2)
        assert r.status_code == 400 and "/v1/translations" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/translations", json={"model": "switch-onnx", "text": "x", "src_lang": "eng_Latn"},
                       timeout=30)
        assert r.status_code == 400 and "language" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/health", timeout=10).json()["batching"] == "one at a time"


def test_requests_arriving_close_together_are_prefilled_together(model, monkeypatch):
    """A prefill run reads every expert whatever its row count, so the scheduler keeps admitting while arrivals
    follow each other closely. Requests 20 ms apart (the gap widened so that a loaded machine cannot split them)
    are prefilled in one run, and each still gets what it gets alone."""
    from moerun.runtime.generation import SamplingConfig
    from moerun.serve import scheduler as sched

    monkeypatch.setattr(sched, "JOIN_GAP", 0.5)
    monkeypatch.setattr(sched, "JOIN_WINDOW", 3.0)
    scheduler = sched.Scheduler(model, max_batch=4, max_queue=8, max_len=64)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS[:4]]
    outputs, done = {i: [] for i in range(4)}, threading.Semaphore(0)

    def emit(i):
        return lambda kind, value: outputs[i].append(value) if kind == "token" else done.release()

    try:
        for i, prompt in enumerate(prompts):
            scheduler.submit(sched.Request(prompt, 6, SamplingConfig(), emit(i)))
            time.sleep(0.02)
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    runs = scheduler.metrics.prefill_size.collect()[0].samples
    count = next(s.value for s in runs if s.name.endswith("_count"))
    assert count == 1, f"{count} prefill runs for 4 requests arriving 20 ms apart"
    for i, prompt in enumerate(prompts):
        assert outputs[i] == model.generate_ids([prompt], max_new_tokens=6)[0]


def test_a_request_after_one_served_alone_is_not_held_for_the_join_window(model, monkeypatch):
    """One client sends its next request when its last one ended: nobody is right behind it, so the scheduler, idle
    after serving one request alone, prefills it at once. A new scheduler, and one that has just served two
    requests at once, wait JOIN_GAP for company. Each request still gets what it gets alone."""
    from moerun.runtime.generation import SamplingConfig
    from moerun.serve import scheduler as sched

    monkeypatch.setattr(sched, "JOIN_GAP", 1.0)
    monkeypatch.setattr(sched, "JOIN_WINDOW", 1.0)
    scheduler = sched.Scheduler(model, max_batch=4, max_queue=8, max_len=64)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS[:5]]

    def send(batch: list[int]) -> dict[int, tuple[float, list[int]]]:
        """Submits PROMPTS[i] for i in batch at once; (time to first token, tokens) of each, once all ended."""
        out, done = {i: (0.0, []) for i in batch}, threading.Semaphore(0)

        def emit(i, start):
            def receive(kind, value):
                if kind != "token":
                    return done.release()
                if not out[i][1]:
                    out[i] = (time.monotonic() - start, out[i][1])
                out[i][1].append(value)
            return receive

        for i in batch:
            scheduler.submit(sched.Request(prompts[i], 4, SamplingConfig(), emit(i, time.monotonic())))
        for _ in batch:
            assert done.acquire(timeout=60)
        return out

    try:
        first, alone, pair, after_pair = send([0]), send([1]), send([2, 3]), send([4])
    finally:
        scheduler.close()
    assert first[0][0] >= 1.0, "a new scheduler waits for company"
    assert alone[1][0] < 0.5, f"{alone[1][0]:.2f} s to the first token after a request served alone"
    assert after_pair[4][0] >= 1.0, "two requests were served at once: the next one waits for company again"
    for i, (_, tokens) in {**first, **alone, **pair, **after_pair}.items():
        assert tokens == model.generate_ids([prompts[i]], max_new_tokens=4)[0]


def test_recurrent_state_model_batches_requests_arriving_together(lfm2_moe_exports, monkeypatch):
    """A hybrid model (LFM2-MoE: short-convolution states beside the KV cache) is served by the runner's own step
    loop, which carries the states: three requests arriving together share one batch, each getting its tokens
    alone."""
    from moerun.runtime.generation import SamplingConfig
    from moerun.serve import scheduler as sched
    from moerun.serve.engine import GroupEngine

    monkeypatch.setattr(sched, "JOIN_GAP", 0.5)
    model = MoEModel.load(lfm2_moe_exports["fp32"], provider="cpu", threads=2)
    assert model.manifest.states
    prompts, lengths = [[1, 45, 67, 89, 100, 120, 7, 9, 11], [1, 30, 5], [1, 7, 8, 9, 10, 11]], [10, 4, 10]
    expected = [model.generate_ids([p], n)[0] for p, n in zip(prompts, lengths)]
    scheduler = sched.Scheduler(model, max_batch=4, max_queue=8, max_len=64)
    assert isinstance(scheduler.engine, GroupEngine)
    outputs, done = {i: [] for i in range(3)}, threading.Semaphore(0)

    def emit(i):
        return lambda kind, value: outputs[i].append(value) if kind == "token" else done.release()

    try:
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            scheduler.submit(sched.Request(prompt, n, SamplingConfig(), emit(i)))
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    runs = {s.name: s.value for s in scheduler.metrics.prefill_size.collect()[0].samples}
    assert runs["moerun_prefill_batch_size_count"] == 1 and runs["moerun_prefill_batch_size_sum"] == 3
    assert [outputs[i] for i in range(3)] == expected
