"""`moerun serve --ray`: two Ray Serve replicas of the same app behind Ray's HTTP proxy, on a local Ray head on
loopback, answer exactly as the model alone (MoEModel.generate_ids, the oracle the single server matches too)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from moerun.runtime import MoEModel
from moerun.serve import ServeSettings

# skipped only where Ray is not installed: an installed but broken Ray fails the import here, loudly
if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (the ray extra)", allow_module_level=True)
import ray.serve  # noqa: E402,F401

PROMPTS = ["Once upon a time", "The king said", "In the morning the little", "Hello", "She looked at the",
           "There was once a"]


def test_two_ray_serve_replicas_answer_as_the_model_alone(tiny_moe_converted):
    import ray
    from ray import serve

    from moerun.serve.ray_app import run_ray

    model_dir = tiny_moe_converted
    model = MoEModel.load(model_dir, provider="cpu", threads=1)
    expected = [model.generate_ids([model.tokenizer.encode(p)], 10)[0] for p in PROMPTS]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        start = time.monotonic()
        run_ray(model_dir, ServeSettings(max_batch=4), "127.0.0.1", port, replicas=2, provider="cpu", threads=1,
                blocking=False)
        base = f"http://127.0.0.1:{port}"
        status = serve.status().applications["moerun"]
        assert status.status == "RUNNING"
        assert status.deployments["moerun"].replica_states.get("RUNNING") == 2

        def send(prompt):
            body = {"model": "tiny-moe", "prompt": prompt, "max_tokens": 10, "temperature": 0}
            return httpx.post(f"{base}/v1/completions", json=body, timeout=60)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            responses = list(pool.map(send, PROMPTS * 2))
        for response, want in zip(responses, expected * 2):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["token_ids"] == want
        bad = httpx.post(f"{base}/v1/completions", json={"model": "tiny-moe", "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
        print(f"ray serve: 2 replicas up and answering in {time.monotonic() - start:.1f} s")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_broken_ray_fails_this_module_instead_of_skipping_it(tmp_path):
    """A Ray whose import fails (a broken install) must fail the Ray test, not skip it unnoticed."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('a broken Ray install')\n")
    (tmp_path / "conftest.py").write_text("")
    here = Path(__file__)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--co", {str(here)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=here.parent)
    assert done.returncode not in (0, 5), done.stdout[-2000:]
    assert "a broken Ray install" in done.stdout
