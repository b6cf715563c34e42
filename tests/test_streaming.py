"""Real-size conversion in bounded memory: weights streamed one layer group at a time, peak memory that
does not grow with the model, interrupted runs that leave nothing, safe output locations."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from transformers import MixtralConfig

from conftest import assert_matches_pytorch, run_cli, save_checkpoint, tiny_mixtral

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from synthetic_checkpoint import synthesize  # noqa: E402


def _shaped(layers: int) -> MixtralConfig:
    """Experts dominate (25 MB a layer in bf16) and the rest is small: the size of what is held shows."""
    config = MixtralConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    config.architectures = ["MixtralForCausalLM"]
    return config


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[int, Path]:
    """Sharded bf16 checkpoints in a release's layout (per-expert tensors), 4 and 16 layers."""
    root = tmp_path_factory.mktemp("synthetic")
    return {n: synthesize(_shaped(n), root / f"mixtral-{n}", seed=n) for n in (4, 16)}


_WORKER = """
import json, sys
from moerun.converter.convert import convert
from moerun.converter.quantize import QuantizeOptions
from moerun.runtime.memory import peak_rss_mb
result = convert(sys.argv[1], sys.argv[2], quantize=QuantizeOptions(method="rtn"))
print(json.dumps({"peak_mb": peak_rss_mb(), "loads": result.group_loads}))
"""


def _convert_measured(source: Path, output: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _WORKER, str(source), str(output)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_model(synthetic, tmp_path):
    small = _convert_measured(synthetic[4], tmp_path / "small")
    large = _convert_measured(synthetic[16], tmp_path / "large")
    # 4x the layers (100 vs 400 MB of bf16 checkpoint, 200 vs 800 MB in fp32): holding the model whole would
    # put the larger run 300-600 MB above the smaller one
    assert large["peak_mb"] <= 1.3 * small["peak_mb"], (small, large)
    assert small["loads"] == 4 + 1 and large["loads"] == 16 + 1  # each layer group read once, plus the rest


def test_bf16_checkpoint_to_fp32_and_int4(tmp_path):
    """A bf16 release converts to fp32 that matches the PyTorch model on the same (bf16-valued) weights."""
    model = tiny_mixtral(seed=3, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2)
    save_checkpoint(model.to(torch.bfloat16), tmp_path / "bf16")
    reference = model.to(torch.float32)  # the bf16 values, computed in fp32
    from moerun import MoEModel
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions

    fp32 = convert(tmp_path / "bf16", tmp_path / "fp32")
    assert fp32.manifest.dtype == "fp32"
    assert_matches_pytorch(reference, MoEModel.load(fp32.output, provider="cpu"), tol=1e-4)
    int4 = convert(tmp_path / "bf16", tmp_path / "int4", quantize=QuantizeOptions(block_size=16), verify=True)
    assert int4.report.greedy_agreement >= 0.8 and int4.report.max_abs < 0.1, int4.report


def test_each_layer_group_is_read_once_and_checksums_match_the_file(tmp_path):
    save_checkpoint(tiny_mixtral(seed=4, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=4, num_hidden_layers=3), tmp_path / "ckpt")
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions

    result = convert(tmp_path / "ckpt", tmp_path / "int4", quantize=QuantizeOptions(block_size=16))
    assert result.group_loads == 3 + 1
    written = result.manifest.weights["model.onnx"]["sha256"]
    model = ir.load(result.output / "model.onnx")
    on_disk = {v.name: hashlib.sha256(np.ascontiguousarray(v.const_value.numpy()).tobytes()).hexdigest()
               for v in model.graph.initializers.values()}
    assert on_disk == written
    assert any(name.endswith(".qweight") for name in written)


def test_verify_on_the_first_layers(tmp_path):
    model = tiny_mixtral(seed=5, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_hidden_layers=4)
    save_checkpoint(model, tmp_path / "ckpt")
    done = run_cli("convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--verify-layers", "2")
    assert done.returncode == 0, done.stderr
    verified = json.loads((tmp_path / "out" / "moerun.json").read_text())["verify"]
    assert verified["scope"] == "first 2 of 4 layers" and verified["passed"]
    assert verified["max_abs_prefill"] < 1e-4 and verified["greedy_agreement"] == 1.0
    assert "verify (first 2 of 4 layers)" in done.stderr
    bad = run_cli("convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "bad"), "--verify-layers", "4")
    assert bad.returncode != 0 and "between 1 and 3" in bad.stderr and not (tmp_path / "bad").exists()


def test_head_size_8_falls_back_to_traced_attention_and_runs(tmp_path):
    model = tiny_mixtral(seed=6, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_hidden_layers=2)
    save_checkpoint(model, tmp_path / "ckpt")
    done = run_cli("convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--verify")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "moerun.json").read_text())["attention"] == "traced"


# --- interrupted runs and output locations ------------------------------------------------------------

def _partials(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.*.partial"))


def _kill_while_writing(source: Path, output: Path, sig: int) -> int:
    exe = Path(sys.executable).with_name("moerun")
    proc = subprocess.Popen([str(exe), "convert", str(source), "-o", str(output)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "write weights" in line:
            break
    time.sleep(0.2)  # into the stream (the 16-layer checkpoint takes seconds to write)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def test_killed_conversion_leaves_no_output_and_a_rerun_cleans_up(synthetic, tmp_path):
    output = tmp_path / "out"
    assert _kill_while_writing(synthetic[16], output, signal.SIGKILL) == -signal.SIGKILL
    assert not output.exists()
    assert len(_partials(output)) == 1  # what SIGKILL leaves: a hidden staging dir, owned by a dead process
    done = run_cli("convert", str(synthetic[16]), "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert (output / "moerun.json").is_file() and _partials(output) == []


def test_terminated_conversion_removes_its_staging(synthetic, tmp_path):
    output = tmp_path / "out"
    assert _kill_while_writing(synthetic[16], output, signal.SIGTERM) == 128 + signal.SIGTERM
    assert not output.exists() and _partials(output) == []


def test_stale_staging_dirs_are_removed_only_when_ours_and_dead(small_checkpoint_dir, tmp_path):
    output = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = (tmp_path / f".out.{tag}.partial" for tag in ("stale", "live", "foreign"))
    for d in (stale, live, foreign):
        d.mkdir()
    (stale / ".moerun-owner").write_text(f"{dead.pid}\n")
    (live / ".moerun-owner").write_text(f"{os.getpid()}\n")
    from moerun.converter.convert import convert

    convert(small_checkpoint_dir, output)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_not_enough_disk_space_fails_before_any_weight_is_read(small_checkpoint_dir, tmp_path, monkeypatch):
    from moerun.converter import output as output_mod
    from moerun.converter import weights
    from moerun.converter.convert import convert
    from moerun.runtime.errors import MoerunError

    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))

    def no_reading(self, group):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(weights.WeightStream, "_load", no_reading)
    with pytest.raises(MoerunError, match=r"not enough disk space in .*: the model needs .* is free"):
        convert(small_checkpoint_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _partials(tmp_path / "out") == []


def test_output_must_not_overlap_the_checkpoint(small_checkpoint_dir, tmp_path):
    copy = shutil.copytree(small_checkpoint_dir, tmp_path / "ckpt")
    before = sorted(p.name for p in copy.iterdir())
    for output in (copy, copy / "onnx", tmp_path):
        done = run_cli("convert", str(copy), "-o", str(output), "--overwrite")
        assert done.returncode == 1, done.stderr
        assert "would overwrite the checkpoint" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in copy.iterdir()) == before


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _can_run_as_nobody() -> bool:
    """Root, setpriv, and an installation another user can execute (not under a private home)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    return subprocess.run([*_AS_NOBODY, sys.executable, "-c", "import moerun"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_run_as_nobody(), reason="needs root and an installation another user can run")
def test_unwritable_output_location_is_one_line_before_any_work(small_checkpoint_dir):
    base = Path(tempfile.mkdtemp(prefix="moerun-ro-", dir="/tmp"))  # a tree another user can traverse
    try:
        base.chmod(0o755)
        checkpoint = shutil.copytree(small_checkpoint_dir, base / "ckpt")
        readonly = base / "ro"
        readonly.mkdir(mode=0o555)
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "HOME": str(base)}
        exe = Path(sys.executable).with_name("moerun")
        for output in (readonly / "out", readonly / "x" / "y"):
            done = subprocess.run([*_AS_NOBODY, str(exe), "convert", str(checkpoint), "-o", str(output)],
                                  capture_output=True, text=True, env=env, timeout=300)
            assert done.returncode == 1, done.stderr
            assert f"cannot write to {readonly}: Permission denied" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and "export ONNX" not in done.stderr  # before any work
    finally:
        shutil.rmtree(base)


def test_output_directory_mode_follows_the_umask(small_checkpoint_dir, tmp_path):
    for umask, mode in ((0o022, 0o755), (0o027, 0o750)):
        output = tmp_path / f"out{umask:o}"
        done = subprocess.run(f"umask {umask:o} && {Path(sys.executable).with_name('moerun')} convert "
                              f"{small_checkpoint_dir} -o {output}", shell=True, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert output.stat().st_mode & 0o777 == mode


@pytest.fixture(scope="module")
def small_checkpoint_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_mixtral(seed=7, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4, num_hidden_layers=2),
                           tmp_path_factory.mktemp("small") / "ckpt")
