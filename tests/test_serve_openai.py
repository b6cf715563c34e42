"""The OpenAI API that agents use, on `moerun serve`: structured output (llguidance), tool calls in three families'
formats, logprobs, n choices sharing one prefill, penalties and logit_bias. Oracles: `jsonschema` validation, the
unmodified `openai` client, transformers' apply_chat_template and RepetitionPenaltyLogitsProcessor, log-softmax of
the runtime's own forward pass, each request alone (MoEModel.generate_ids)."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import pytest
from test_serve import PROMPTS, metric, wait_for

from moerun.runtime import MoEModel
from moerun.serve import ServeSettings, create_app

HERMES = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\nCall: <tool_call>"
    "</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{%- if message.content %}{{ message.content }}"
    "{%- endif %}{%- for call in message.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments if call.function.arguments is string else call.function.arguments "
    "| tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message.role == 'user' %}{% if loop.last and tools %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ message.content }}[/INST]"
    "{% elif message.role == 'assistant' %}{% if message.tool_calls %}[TOOL_CALLS][{% for call in message.tool_calls %}"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments }}}{% if not loop.last %}, "
    "{% endif %}{% endfor %}]{% else %}{{ message.content }}{% endif %}{{ eos_token }}"
    "{% elif message.role == 'tool' %}[TOOL_RESULTS]{\"content\": {{ message.content | tojson }}}[/TOOL_RESULTS]"
    "{% endif %}{% endfor %}"
)
HARMONY = (
    "{% if tools %}<|start|>developer<|message|># Tools\n{% for tool in tools %}to=functions.{{ tool.function.name }}"
    ": {{ tool.function.parameters | tojson }}\n{% endfor %}<|end|>{% endif %}{% for message in messages %}"
    "<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
TEMPLATES = {"hermes": HERMES, "mistral": MISTRAL, "harmony": HARMONY}

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}}}


def _serve(model, **settings):
    from moerun.serve.launch import make_server

    server = make_server(create_app(model, ServeSettings(**settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 30)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


@pytest.fixture(scope="module")
def servers(tiny_moe_converted, tmp_path_factory):
    """A server per tool-call format (the same model, its chat template written in); {format: (base, model)}."""
    out, running = {}, []
    for name, template in TEMPLATES.items():
        directory = tmp_path_factory.mktemp(name) / "tiny-moe"
        shutil.copytree(tiny_moe_converted, directory)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        model = MoEModel.load(directory, provider="cpu", threads=1)
        base, server, thread = _serve(model, max_batch=8, max_queue=64, max_len=512)
        running.append((server, thread))
        out[name] = (base, model)
    yield out
    for server, thread in running:
        server.should_exit = True
        thread.join(20)


def _closed(schema):
    """additionalProperties false on every object, as OpenAI's strict mode requires of a schema."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    return [_closed(v) for v in schema] if isinstance(schema, list) else schema


def _schemas() -> list[dict]:
    return [_closed(s) for s in _open_schemas()]


def _open_schemas() -> list[dict]:
    word = {"type": "string", "maxLength": 8}
    small = {"type": "integer", "minimum": 0, "maximum": 99}
    return [
        {"type": "object", "properties": {"name": word}, "required": ["name"]},
        {"type": "object", "properties": {"age": small}, "required": ["age"]},
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
        {"type": "object", "properties": {"tags": {"type": "array", "items": word, "maxItems": 3}},
         "required": ["tags"]},
        {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": small, "y": small},
                                                    "required": ["x", "y"]}}, "required": ["point"]},
        {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
         "required": ["score"]},
        {"type": "object", "properties": {"a": word, "b": small, "c": {"type": "boolean"}},
         "required": ["a", "b", "c"]},
        {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"id": small, "label": word}, "required": ["id", "label"]}}},
         "required": ["items"]},
        {"type": "object", "properties": {"kind": {"const": "user"}, "level": {"enum": [1, 2, 3]}},
         "required": ["kind", "level"]},
        {"type": "object", "properties": {"maybe": {"anyOf": [small, {"type": "null"}]}}, "required": ["maybe"]},
        {"type": "object", "properties": {"nested": {"type": "object", "properties": {"deeper": {
            "type": "object", "properties": {"v": small}, "required": ["v"]}}, "required": ["deeper"]}},
         "required": ["nested"]},
        {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                                    "maxItems": 4}}, "required": ["flags"]},
        {"type": "object", "properties": {"first": word, "last": word}, "required": ["first", "last"],
         "additionalProperties": False},
        {"type": "object", "properties": {"temp": {"type": "integer", "minimum": -40, "maximum": 50}},
         "required": ["temp"]},
        {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": small},
         "required": ["status", "code"], "additionalProperties": False},
        {"type": "array", "items": small, "minItems": 1, "maxItems": 3},
        {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
            "type": "array", "items": small, "maxItems": 2}}}, "required": ["matrix"]},
        {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}, "required": ["id"]},
        {"type": "object", "properties": {"when": {"enum": ["today", "tomorrow"]}, "count": small,
                                          "notes": {"type": "array", "items": word, "maxItems": 2}},
         "required": ["when", "count", "notes"], "additionalProperties": False},
    ]


def _stream_text(response: httpx.Response, chat: bool) -> tuple[str, str]:
    text, reason = "", None
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                text += (choice["delta"].get("content") or "") if chat else choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


def test_twenty_json_schemas_validate_streamed_and_not_beside_free_requests(servers):
    base, model = servers["hermes"]
    schemas = _schemas()
    assert len(schemas) == 20
    free = [dict(prompt=p, max_tokens=12, temperature=0) for p in PROMPTS[:4]]
    expected = [model.generate_ids([model.tokenizer.encode(r["prompt"])], 12)[0] for r in free]
    steps_before = metric(base, "moerun_batch_size_sum")

    def constrained(i: int, stream: bool):
        schema = schemas[i]
        response_format = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        chat = i % 2 == 0
        body = {"max_tokens": 200, "temperature": 0 if i % 3 else 0.8, "seed": i, "response_format": response_format,
                "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": f"Give me JSON number {i}"}]
        else:
            body["prompt"] = PROMPTS[i % len(PROMPTS)]
        url = f"{base}/v1/{'chat/completions' if chat else 'completions'}"
        if stream:
            with httpx.stream("POST", url, json=body, timeout=300) as r:
                return _stream_text(r, chat)
        r = httpx.post(url, json=body, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]

    with ThreadPoolExecutor(44) as pool:
        frees = [pool.submit(httpx.post, f"{base}/v1/completions", json=r, timeout=300) for r in free]
        jobs = [(i, s, pool.submit(constrained, i, s)) for i in range(20) for s in (False, True)]
        for i, stream, job in jobs:
            text, reason = job.result()
            assert reason == "stop", (i, stream, text, reason)
            jsonschema.validate(json.loads(text), schemas[i])
        for job, want in zip(frees, expected):
            assert job.result().json()["choices"][0]["token_ids"] == want
    assert metric(base, "moerun_batch_size_sum") - steps_before > 44  # they shared decode steps
    # json_object: any JSON object
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "Data:", "max_tokens": 100, "temperature": 0,
                                                   "response_format": {"type": "json_object"}}, timeout=120)
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    else:  # an object the model kept writing till max_tokens: still the start of one
        assert choice["text"].startswith("{")
    bad = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/nowhere"}}}}}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text


def test_generate_takes_a_response_format_and_reports_logprobs(servers):
    _, model = servers["hermes"]
    schema = _schemas()[7]
    prompts = [model.tokenizer.encode(p) for p in PROMPTS[:3]]
    out = model.generate_ids(prompts, 120, response_format={"type": "json_schema", "json_schema": {"schema": schema}},
                             logprobs=2)
    for row, picks in zip(out, model.last_picks):
        jsonschema.validate(json.loads(model.tokenizer.decode(row)), schema)
        assert [p.token for p in picks] == row and all(len(p.top) == 2 for p in picks)


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "harmony"])
def test_named_and_required_tool_choice_give_tool_calls_the_openai_client_parses(servers, fmt):
    import openai

    base, model = servers[fmt]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice_asked in ({"type": "function", "function": {"name": "get_time"}}, "required"):
        done = client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice=choice_asked, max_tokens=120, temperature=0,
                                              parallel_tool_calls=False)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert len(calls) == 1
        if isinstance(choice_asked, dict):
            assert calls[0].function.name == "get_time"
        jsonschema.validate(json.loads(calls[0].function.arguments), schemas[calls[0].function.name])
    stream = client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=120, temperature=0, stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0][0].function.name == "get_weather"
    jsonschema.validate(json.loads(deltas[0][0].function.arguments), schemas["get_weather"])


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_tools_and_a_tool_result_render_as_transformers_renders_them(servers, fmt):
    import openai
    from transformers import AutoTokenizer

    from moerun.serve.chat import load_chat_template
    from moerun.serve.protocol import ChatMessage

    base, model = servers[fmt]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=120, temperature=0,
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "sunny, 18 C"})}]
    second = client.chat.completions.create(model="tiny-moe", messages=history, tools=[WEATHER, TIME],
                                            max_tokens=8, temperature=0)
    hf = AutoTokenizer.from_pretrained(model.directory)
    ours = load_chat_template(model.directory).render([ChatMessage(**m).as_template_dict() for m in history],
                                                      [WEATHER, TIME])
    theirs = hf.apply_chat_template(history, tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    assert ours == theirs and call.function.arguments in ours
    ids = hf.apply_chat_template(history, tools=[WEATHER, TIME], tokenize=True, add_generation_prompt=True,
                                 return_dict=False)
    assert second.usage.prompt_tokens == len(ids)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def test_logprobs_are_the_log_softmax_of_the_logits_that_picked_the_token(servers):
    base, model = servers["hermes"]
    tok = model.tokenizer
    r = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0,
                                                   "logprobs": 3}, timeout=60).json()["choices"][0]
    prompt = tok.encode(PROMPTS[2])
    sequence = np.array([prompt + r["token_ids"]])
    logits, _ = model.forward(sequence, np.ones_like(sequence))  # one direct run over prompt and output
    expected = _log_softmax(logits[0, len(prompt) - 1: len(prompt) - 1 + len(r["token_ids"])])
    chosen = expected[np.arange(len(r["token_ids"])), r["token_ids"]]
    np.testing.assert_allclose(r["logprobs"]["token_logprobs"], chosen, atol=1e-4)
    for top, row in zip(r["logprobs"]["top_logprobs"], expected):
        assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)
    chat = httpx.post(f"{base}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 2}, timeout=60).json()["choices"][0]
    for entry in chat["logprobs"]["content"]:
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the most likely is the chosen
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])


def test_n_choices_share_one_prefill_and_each_equals_its_seed_alone(servers):
    base, model = servers["mistral"]
    prompt = model.tokenizer.encode(PROMPTS[5])
    runs, rows = metric(base, "moerun_prefill_batch_size_count"), metric(base, "moerun_prefill_batch_size_sum")
    r = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[5], "max_tokens": 10, "temperature": 0.9,
                                                   "seed": 11, "n": 3}, timeout=60).json()
    assert metric(base, "moerun_prefill_batch_size_count") - runs == 1
    assert metric(base, "moerun_prefill_batch_size_sum") - rows == 1  # one prompt prefilled, copied twice
    got = [c["token_ids"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    want = [model.generate_ids([prompt], 10, do_sample=True, temperature=0.9, seed=11 + i)[0] for i in range(3)]
    assert got == want and len({tuple(g) for g in got}) > 1
    assert r["usage"]["completion_tokens"] == sum(map(len, got)) and r["usage"]["prompt_tokens"] == len(prompt)


def test_penalties_and_logit_bias_as_defined(servers):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    base, model = servers["harmony"]
    prompt = model.tokenizer.encode(PROMPTS[0])

    def served(**body):
        return httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                                          **body}, timeout=60).json()["choices"][0]["token_ids"]

    def oracle(adjust) -> list[int]:
        out = []
        for _ in range(12):
            sequence = np.array([prompt + out])
            logits = model.forward(sequence, np.ones_like(sequence))[0][0, -1]
            token = int(np.argmax(adjust(logits.astype(np.float32), out)))
            out.append(token)
            if token in model.manifest.eos_token_id:
                break
        return out

    hf_penalty = RepetitionPenaltyLogitsProcessor(1.5)

    def repetition(logits, out):
        ids = torch.tensor([prompt + out])
        return hf_penalty(ids, torch.from_numpy(logits)[None])[0].numpy()

    def presence_frequency(logits, out):  # OpenAI's definition
        counts = np.bincount(np.array(out, dtype=np.int64), minlength=logits.shape[-1])
        return logits - 0.8 * (counts > 0) - 0.6 * counts

    assert served(repetition_penalty=1.5) == oracle(repetition)
    assert served(presence_penalty=0.8, frequency_penalty=0.6) == oracle(presence_frequency)
    assert served(presence_penalty=0.8, frequency_penalty=0.6) != served()
    assert served(logit_bias={"77": 100}) == [77] * 12
