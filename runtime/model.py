"""MoEModel: load a moerun model directory and generate from it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .errors import ModelDirError, MoerunError
from .generation import DecoderRunner, GenerationStats, SamplingConfig, right_pad
from .manifest import Manifest
from .search import SearchConfig, search
from .seq2seq import EncoderOutput, Seq2SeqRunner
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
        for name in manifest.graphs():
            if not (directory / name).is_file():
                raise ModelDirError(f"{directory}: {name} is missing")
        chosen = resolve_provider(provider)
        tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        decoder = create_session(str(directory / manifest.model_file), chosen, threads)
        if manifest.is_seq2seq:
            encoder = create_session(str(directory / manifest.encoder_file), chosen, threads)
            return cls(directory, manifest, Seq2SeqRunner(encoder, decoder, manifest), tokenizer, chosen)
        return cls(directory, manifest, DecoderRunner(decoder, manifest, chosen), tokenizer, chosen)

    @property
    def execution_provider(self) -> str:
        """The ONNX Runtime execution provider that runs the model."""
        session = self.runner.decoder if self.manifest.is_seq2seq else self.runner.session
        return session.get_providers()[0]

    @property
    def pad_token_id(self) -> int:
        m = self.manifest
        if m.pad_token_id is not None:
            return m.pad_token_id
        return m.eos_token_id[0] if m.eos_token_id else 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                position_ids: np.ndarray | None = None, past: list | None = None) -> tuple[np.ndarray, list]:
        """One decoder step on token ids: (logits (batch, seq, vocab), presents as numpy arrays).

        Fused-attention models (manifest ``attention: gqa``) take right-padded masks and derive
        positions from them; ``position_ids`` are for traced-attention models (left padding).
        """
        self._require(seq2seq=False)
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past_len = 0 if past is None else past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        if not self.manifest.fused_attention:
            if position_ids is None:
                position_ids = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq))
            feeds["position_ids"] = np.asarray(position_ids, dtype=np.int64)
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
        self._require(seq2seq=False)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        out, self.last_stats = self.runner.generate(
            [list(p) for p in prompts], max_new_tokens, sampling, self.manifest.eos_token_id, self.pad_token_id
        )
        return out

    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, **sampling) -> list[str]:
        """Completions (the new text only) for each prompt, greedy unless do_sample=True."""
        self._require(seq2seq=False)
        if self.tokenizer is None:
            raise MoerunError(f"{self.directory} has no tokenizer.json: use generate_ids() with token ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.tokenizer.encode(p) for p in prompts]
        new = self.generate_ids(encoded, max_new_tokens, **sampling)
        return [self.tokenizer.decode(ids) for ids in new]

    # --- encoder-decoder (translation) models -------------------------------------------------

    def _require(self, seq2seq: bool) -> None:
        if self.manifest.is_seq2seq != seq2seq:
            kind = "an encoder-decoder" if self.manifest.is_seq2seq else "a decoder-only"
            use = "translate()/translate_ids()" if self.manifest.is_seq2seq else "generate()/generate_ids()"
            raise MoerunError(f"{self.directory} holds {kind} model ({self.manifest.architecture}): use {use}")

    def encode(self, sources: list[list[int]]) -> EncoderOutput:
        """Run the encoder on source token ids (right-padded, as the original tokenizers pad)."""
        self._require(seq2seq=True)
        return self.runner.encode(*right_pad(sources, self.pad_token_id))

    def translate_ids(self, sources: list[list[int]], *, forced_bos_token_id: int | None = None,
                      num_beams: int = 1, max_length: int = 200, max_new_tokens: int | None = None,
                      length_penalty: float = 1.0, early_stopping: bool | str = False,
                      no_repeat_ngram_size: int = 0, prune: bool = True) -> list[list[int]]:
        """Decoder token ids per source, as Hugging Face ``generate`` returns them (start token first,
        then the forced language token if any, the translation, eos), without trailing padding."""
        self._require(seq2seq=True)
        m = self.manifest
        if m.decoder_start_token_id is None:
            raise MoerunError(f"{self.directory}: the manifest has no decoder_start_token_id")
        config = SearchConfig(num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, early_stopping=early_stopping,
                              no_repeat_ngram_size=no_repeat_ngram_size, prune=prune)
        start_time = time.perf_counter()
        encoded = self.encode(sources)
        encode_s = time.perf_counter() - start_time
        state = self.runner.start(encoded)
        start = np.full((len(sources), 1), m.decoder_start_token_id, dtype=np.int64)
        result = search(state, len(sources), start, eos_token_id=m.eos_token_id, pad_token_id=self.pad_token_id,
                        config=config, forced_bos_token_id=forced_bos_token_id)
        self.last_stats = GenerationStats(
            prefill_tokens=int(encoded.attention_mask.sum()), prefill_s=encode_s,
            decode_tokens=state.rows_computed, decode_s=state.seconds,
            extra={"decoder_rows": state.rows_computed, "decoder_steps": state.steps},
        )
        pad = self.pad_token_id
        out = []
        for row in result.sequences.tolist():
            while len(row) > 1 and row[-1] == pad:
                row.pop()
            out.append(row)
        return out

    def translate(self, texts: str | list[str], src_lang: str | None = None, tgt_lang: str | None = None,
                  **search_options) -> list[str]:
        """Translations of ``texts``; NLLB-style models need src_lang and tgt_lang (e.g. eng_Latn, fra_Latn)."""
        self._require(seq2seq=True)
        if self.tokenizer is None:
            raise MoerunError(f"{self.directory} has no tokenizer.json: use translate_ids() with token ids")
        if isinstance(texts, str):
            texts = [texts]
        forced = None
        if self.tokenizer.languages:
            if not src_lang or not tgt_lang:
                raise MoerunError("this model translates between languages: pass src_lang and tgt_lang "
                                  f"(e.g. {', '.join(self.tokenizer.languages[:3])})")
            forced = self.tokenizer.lang_id(tgt_lang)
        sources = [self.tokenizer.encode_source(t, src_lang) for t in texts]
        ids = self.translate_ids(sources, forced_bos_token_id=forced, **search_options)
        return [self.tokenizer.decode(row) for row in ids]
