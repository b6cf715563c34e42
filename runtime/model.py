"""MoEModel: load a moerun model directory and generate from it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import ModelDirError, MoerunError
from .generation import DecoderRunner, GenerationStats, SamplingConfig
from .manifest import Manifest
from .session import create_session, resolve_provider
from .tokenizer import Tokenizer

__all__ = ["MoEModel"]

log = logging.getLogger(__name__)


class MoEModel:
    """An exported MoE decoder on ONNX Runtime, with its tokenizer.

    >>> m = MoEModel.load("./my-mixtral-onnx")            # provider="auto" | "cuda" | "cpu"
    >>> m.generate(["Hello", "A longer prompt"], max_new_tokens=32)
    """

    def __init__(self, directory: Path, manifest: Manifest, runner: DecoderRunner,
                 tokenizer: Tokenizer | None, provider: str) -> None:
        self.directory = directory
        self.manifest = manifest
        self.runner = runner
        self.tokenizer = tokenizer
        self.provider = provider
        self.last_stats = GenerationStats()

    @classmethod
    def load(cls, directory: str | Path, provider: str = "auto", threads: int | None = None) -> MoEModel:
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelDirError(f"{directory}: no such model directory")
        manifest = Manifest.load(directory)
        model_file = directory / manifest.model_file
        if not model_file.is_file():
            raise ModelDirError(f"{directory}: {manifest.model_file} is missing")
        chosen = resolve_provider(provider)
        session = create_session(str(model_file), chosen, threads)
        tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        return cls(directory, manifest, DecoderRunner(session, manifest, chosen), tokenizer, chosen)

    @property
    def execution_provider(self) -> str:
        """The ONNX Runtime execution provider that runs the model."""
        return self.runner.session.get_providers()[0]

    @property
    def pad_token_id(self) -> int:
        m = self.manifest
        if m.pad_token_id is not None:
            return m.pad_token_id
        return m.eos_token_id[0] if m.eos_token_id else 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                position_ids: np.ndarray | None = None, past: list | None = None) -> tuple[np.ndarray, list]:
        """One decoder step on token ids: (logits (batch, seq, vocab), presents as numpy arrays)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past_len = 0 if past is None else past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq))
        feeds = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64),
                 "position_ids": np.asarray(position_ids, dtype=np.int64)}
        dtype = self.runner.kv_dtype
        shapes = self.manifest.past_shapes(batch)
        for i, name in enumerate(self.runner.past_names):
            feeds[name] = np.zeros(shapes[i], dtype=dtype) if past is None else np.asarray(past[i], dtype=dtype)
        logits, *presents = self.runner.session.run(None, feeds)
        return logits, presents

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, *, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int | None = None) -> list[list[int]]:
        """New token ids per prompt (greedy by default); each row ends at its first EOS."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        out, self.last_stats = self.runner.generate(
            [list(p) for p in prompts], max_new_tokens, sampling, self.manifest.eos_token_id, self.pad_token_id
        )
        return out

    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, **sampling) -> list[str]:
        """Completions (the new text only) for each prompt, greedy unless do_sample=True."""
        if self.tokenizer is None:
            raise MoerunError(f"{self.directory} has no tokenizer.json: use generate_ids() with token ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.tokenizer.encode(p) for p in prompts]
        new = self.generate_ids(encoded, max_new_tokens, **sampling)
        return [self.tokenizer.decode(ids) for ids in new]
