"""MoEModel.load: a moerun model directory on ONNX Runtime, as a DecoderModel (generate) or a Seq2SeqModel
(translate)."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .checks import check_count, check_fits, check_graph, check_ids, check_prompts, check_texts
from .errors import ModelDirError, MoerunError, MoerunWarning, PlacementError, RequestError
from .generation import DecoderRunner, GenerationStats, SamplingConfig, right_pad, trim_at_eos
from .grammar import Grammar, response_schema, schema_grammar
from .logits import LogitsOptions, TokenPicker
from .manifest import MANIFEST_FILE, Manifest, decoder_io_names, seq2seq_io_names
from .search import SearchConfig, search
from .seq2seq import EncoderOutput, Seq2SeqRunner
from .session import choose_provider, create_session, onnxruntime_errors
from .tokenizer import Tokenizer

__all__ = ["DecoderModel", "MoEModel", "Seq2SeqModel"]

log = logging.getLogger(__name__)


class MoEModel:
    """An exported MoE model on ONNX Runtime, with its tokenizer. ``MoEModel.load`` returns a DecoderModel
    (decoder-only: generate, generate_ids, forward) or a Seq2SeqModel (encoder-decoder: translate,
    translate_ids, encode); the other kind's methods raise a one-line error that names the right ones.

    >>> m = MoEModel.load("./my-mixtral-onnx")            # provider="auto" | "cuda" | "cpu"
    >>> m.generate(["Hello", "A longer prompt"], max_new_tokens=32)

    One model can serve several threads at once: every call has its own KV cache and IO binding, and
    ``last_stats`` is per thread.
    """

    kind = "a"  # what the error for the other kind's methods calls this model
    methods = ""  # and the methods it names instead

    def __init__(self, directory: Path, manifest: Manifest, runner, tokenizer: Tokenizer | None,
                 provider: str) -> None:
        self.directory = directory
        self.manifest = manifest
        self.runner = runner
        self.tokenizer = tokenizer
        self.provider = provider
        self._local = threading.local()

    @property
    def last_stats(self) -> GenerationStats:
        """Speed of this thread's last generate/translate call (each thread sees its own)."""
        return getattr(self._local, "stats", None) or GenerationStats()

    @last_stats.setter
    def last_stats(self, stats: GenerationStats) -> None:
        self._local.stats = stats

    @classmethod
    def load(cls, directory: str | Path, provider: str = "auto", threads: int | None = None) -> MoEModel:
        """The model in ``directory``: a DecoderModel or a Seq2SeqModel, as its manifest says.

        provider "auto" runs on CUDA when a device is usable and the model can run there whole (fp16 is the CUDA
        export), else on the CPU; "cuda" refuses a model whose nodes would fall back to the CPU, and warns for
        fp32. The CUDA paths are untested by moerun's test suite (scripts/check_cuda.py checks them on a GPU).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelDirError(f"{directory}: no such model directory")
        manifest = Manifest.load(directory)
        model_class = Seq2SeqModel if manifest.is_seq2seq else DecoderModel
        if not issubclass(model_class, cls):
            raise MoerunError(f"{directory} holds {model_class.kind} model ({manifest.architecture}): load it with "
                              f"MoEModel.load or {model_class.__name__}.load")
        for name in manifest.graphs():
            if not (directory / name).is_file():
                raise ModelDirError(f"{directory}: {name} is missing")
        chosen, warning = choose_provider(provider, manifest)
        if warning:
            warnings.warn(f"{directory}: {warning}", MoerunWarning, stacklevel=2)
        tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        try:
            return model_class._open(directory, manifest, tokenizer, chosen, threads)
        except PlacementError as e:
            if provider != "auto":
                raise
            log.warning("%s; provider auto runs it on the CPU instead", e)
            return model_class._open(directory, manifest, tokenizer, "cpu", threads)

    @classmethod
    def _open(cls, directory: Path, manifest: Manifest, tokenizer: Tokenizer | None, provider: str,
              threads: int | None) -> MoEModel:
        raise NotImplementedError

    @staticmethod
    def _check_io_names(directory: Path, manifest: Manifest, names: tuple[list[str], list[str]]) -> None:
        if (manifest.inputs, manifest.outputs) != tuple(names):
            raise ModelDirError(f"{directory / MANIFEST_FILE}: its inputs and outputs are not those of "
                                f"{manifest.model_file}; re-convert the checkpoint or fix the file")

    @property
    def _session(self):
        raise NotImplementedError

    @property
    def execution_provider(self) -> str:
        """The ONNX Runtime execution provider that runs the model."""
        return self._session.get_providers()[0]

    @property
    def pad_token_id(self) -> int:
        m = self.manifest
        if m.pad_token_id is not None:
            return m.pad_token_id
        return m.eos_token_id[0] if m.eos_token_id else 0

    # --- the other kind's methods: one clear error ---------------------------------------------

    def _wrong_kind(self) -> MoerunError:
        return MoerunError(f"{self.directory} holds {self.kind} model ({self.manifest.architecture}): "
                           f"use {self.methods}")

    def forward(self, *args, **kwargs) -> tuple[np.ndarray, list]:
        """One decoder step (decoder-only models: DecoderModel.forward)."""
        raise self._wrong_kind()

    def generate_ids(self, *args, **kwargs) -> list[list[int]]:
        """New token ids per prompt (decoder-only models: DecoderModel.generate_ids)."""
        raise self._wrong_kind()

    def generate(self, *args, **kwargs) -> str | list[str]:
        """Completions (decoder-only models: DecoderModel.generate)."""
        raise self._wrong_kind()

    def encode(self, *args, **kwargs) -> EncoderOutput:
        """The encoder's output (encoder-decoder models: Seq2SeqModel.encode)."""
        raise self._wrong_kind()

    def translate_ids(self, *args, **kwargs) -> list[list[int]]:
        """Decoder token ids per source (encoder-decoder models: Seq2SeqModel.translate_ids)."""
        raise self._wrong_kind()

    def translate(self, *args, **kwargs) -> str | list[str]:
        """Translations (encoder-decoder models: Seq2SeqModel.translate)."""
        raise self._wrong_kind()


class DecoderModel(MoEModel):
    """A decoder-only MoE model (Mixtral, Qwen-MoE, ...): generate, generate_ids, forward."""

    kind = "a decoder-only"
    methods = "generate()/generate_ids()"

    @classmethod
    def _open(cls, directory: Path, manifest: Manifest, tokenizer: Tokenizer | None, provider: str,
              threads: int | None) -> DecoderModel:
        session = create_session(str(directory / manifest.model_file), provider, threads)
        runner = DecoderRunner(session, manifest, provider)
        # The graph must be what the manifest says (layers, attention, dtype, head sizes), or the first request
        # would fail inside ONNX Runtime.
        names = decoder_io_names(manifest.num_layers, positions=not manifest.fused_attention,
                                 state_layers=manifest.state_layers())
        check_graph(session, directory / manifest.model_file, *names, manifest, runner.past_names)
        cls._check_io_names(directory, manifest, names)
        return cls(directory, manifest, runner, tokenizer, provider)

    @property
    def _session(self):
        return self.runner.session

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                position_ids: np.ndarray | None = None, past: list | None = None) -> tuple[np.ndarray, list]:
        """One decoder step on token ids: (logits (batch, seq, vocab), presents as numpy arrays).

        Fused-attention models (manifest ``attention: gqa``) take right-padded masks and derive
        positions from them; ``position_ids`` are for traced-attention models (left padding).
        """
        input_ids = check_ids(input_ids, "input_ids", self.manifest.vocab_size, ndim=2)
        batch, seq = input_ids.shape
        if past is not None and len(past) != len(self.runner.past_names):
            what = "key and value per attention layer, states per stateful layer" if self.manifest.states else \
                "key and value per layer"
            raise RequestError(f"past must hold {len(self.runner.past_names)} arrays ({what}), got {len(past)}")
        # the past length of the first KV input (hybrid models' fixed-size states come in layer order beside them)
        first_kv = next((i for i, n in enumerate(self.runner.past_names) if n.startswith("past_key_values.")), 0)
        past_len = 0 if past is None else past[first_kv].shape[2]
        if self.manifest.max_positions is not None and past_len + seq > self.manifest.max_positions:
            raise RequestError(f"{past_len + seq} positions (past {past_len} + {seq} new) are more than this "
                               f"model's {self.manifest.max_positions}; shorten the input")
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
        with onnxruntime_errors(self.manifest.model_file):
            logits, *presents = self.runner.session.run(None, feeds)
        return logits, presents

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, *, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int | None = None, response_format: dict | None = None, logprobs: int | None = None,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None) -> list[list[int]]:
        """New token ids per prompt (greedy by default); each row ends at its first EOS.

        ``response_format``: OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}} (or a bare JSON schema): every row's text is JSON that validates (constrained decoding, llguidance).
        ``logprobs``: k >= 0 records each token's log-probability and the k most likely in ``last_picks`` (per
        row, per token: runtime.logits.Pick), from the logits that picked it (after penalties and the grammar).
        The penalties and logit_bias are OpenAI's (runtime.logits).

        The request is checked whole before the model runs: ids in the vocabulary, and every prompt with its
        max_new_tokens within the model's positions."""
        prompts = check_prompts(prompts, self.manifest.vocab_size)
        check_count(max_new_tokens, "max_new_tokens")
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        options = LogitsOptions(presence_penalty, frequency_penalty, repetition_penalty, dict(logit_bias or {}),
                                logprobs)
        check_fits([len(p) for p in prompts], max_new_tokens, self.manifest.max_positions)
        pickers = None
        if response_format is not None or not options.plain:
            grammar = None if response_format is None else self.grammar(response_format)
            rng = np.random.default_rng(seed)
            pickers = [TokenPicker(sampling, options, grammar and grammar.matcher(), rng, p) for p in prompts]
        with onnxruntime_errors(self.manifest.model_file):
            out, self.last_stats = self.runner.generate(
                prompts, max_new_tokens, sampling, self.manifest.eos_token_id, self.pad_token_id, pickers
            )
        self._local.picks = [] if pickers is None else [p.picks for p in pickers]
        return out

    @property
    def last_picks(self) -> list:
        """Per row of this thread's last generate_ids call with ``logprobs``: a runtime.logits.Pick per token."""
        return getattr(self._local, "picks", [])

    def grammar(self, response_format: dict) -> Grammar:
        """The compiled grammar for an OpenAI ``response_format`` (json_object, json_schema) or a bare schema."""
        return schema_grammar(response_schema(response_format), self.tokenizer, self.runner.vocab,
                              self.manifest.eos_token_id)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 32, **sampling) -> str | list[str]:
        """Completions (the new text only), greedy unless do_sample=True: a str for a str, a list for a list."""
        if self.tokenizer is None:
            raise MoerunError(f"{self.directory} has no tokenizer.json: use generate_ids() with token ids")
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        check_texts(texts)
        new = self.generate_ids([self.tokenizer.encode(t) for t in texts], max_new_tokens, **sampling)
        completions = [self.tokenizer.decode(ids) for ids in new]
        return completions[0] if single else completions


class Seq2SeqModel(MoEModel):
    """An encoder-decoder MoE model (NLLB-MoE, Switch Transformers): translate, translate_ids, encode."""

    kind = "an encoder-decoder"
    methods = "translate()/translate_ids()"

    @classmethod
    def _open(cls, directory: Path, manifest: Manifest, tokenizer: Tokenizer | None, provider: str,
              threads: int | None) -> Seq2SeqModel:
        decoder = create_session(str(directory / manifest.model_file), provider, threads)
        encoder = create_session(str(directory / manifest.encoder_file), provider, threads)
        runner = Seq2SeqRunner(encoder, decoder, manifest, provider)
        names = seq2seq_io_names(manifest.num_layers)
        check_graph(encoder, directory / manifest.encoder_file, *names["encoder"], manifest)
        check_graph(decoder, directory / manifest.model_file, *names["decoder"], manifest, runner.past_names)
        cls._check_io_names(directory, manifest, names["decoder"])
        return cls(directory, manifest, runner, tokenizer, provider)

    @property
    def _session(self):
        return self.runner.decoder

    def encode(self, sources: list[list[int]]) -> EncoderOutput:
        """Run the encoder on source token ids (right-padded, as the original tokenizers pad)."""
        sources = check_prompts(sources, self.manifest.vocab_size, what="source")
        check_fits([len(s) for s in sources], 0, self.manifest.max_positions, what="source")
        with onnxruntime_errors(self.manifest.encoder_file):
            return self.runner.encode(*right_pad(sources, self.pad_token_id))

    def translate_ids(self, sources: list[list[int]], *, forced_bos_token_id: int | None = None,
                      num_beams: int = 1, max_length: int = 200, max_new_tokens: int | None = None,
                      length_penalty: float = 1.0, early_stopping: bool | str = False,
                      no_repeat_ngram_size: int = 0, prune: bool = True,
                      should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """Decoder token ids per source, as Hugging Face ``generate`` returns them (start token first,
        then the forced language token if any, the translation, eos), without trailing padding.
        ``should_stop``: asked before each decoder step; True raises RequestCancelledError (a server's timeout or a
        client gone)."""
        m = self.manifest
        if m.decoder_start_token_id is None:
            raise MoerunError(f"{self.directory}: the manifest has no decoder_start_token_id")
        config = SearchConfig(num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens,
                              length_penalty=length_penalty, early_stopping=early_stopping,
                              no_repeat_ngram_size=no_repeat_ngram_size, prune=prune)
        start_time = time.perf_counter()
        encoded = self.encode(sources)
        encode_s = time.perf_counter() - start_time
        state = self.runner.start(encoded, should_stop)
        start = np.full((len(sources), 1), m.decoder_start_token_id, dtype=np.int64)
        with onnxruntime_errors(m.model_file):
            result = search(state, len(sources), start, eos_token_id=m.eos_token_id,
                            pad_token_id=self.pad_token_id, config=config, forced_bos_token_id=forced_bos_token_id)
        pad = self.pad_token_id
        out = []
        for row in result.sequences.tolist():
            while len(row) > 1 and row[-1] == pad:
                row.pop()
            out.append(row)
        # decode tokens: what the search really generated (to each row's first eos), not the rows it computed
        eos = set(m.eos_token_id)
        generated = sum(len(trim_at_eos(row[start.shape[1]:], eos)) for row in out)
        self.last_stats = GenerationStats(
            prefill_tokens=int(encoded.attention_mask.sum()), prefill_s=encode_s,
            decode_tokens=generated, decode_s=state.seconds,
            extra={"decoder_rows": state.rows_computed, "decoder_steps": state.steps},
        )
        return out

    def translate(self, texts: str | list[str], src_lang: str | None = None, tgt_lang: str | None = None,
                  **search_options) -> str | list[str]:
        """Translations of ``texts`` (a str for a str, a list for a list); NLLB-style models need src_lang and
        tgt_lang (e.g. eng_Latn, fra_Latn)."""
        if self.tokenizer is None:
            raise MoerunError(f"{self.directory} has no tokenizer.json: use translate_ids() with token ids")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        check_texts(texts, what="text")
        forced = None
        if self.tokenizer.languages:
            if not src_lang or not tgt_lang:
                raise MoerunError("this model translates between languages: pass src_lang and tgt_lang "
                                  f"(e.g. {', '.join(self.tokenizer.languages[:3])})")
            forced = self.tokenizer.lang_id(tgt_lang)
        sources = [self.tokenizer.encode_source(t, src_lang) for t in texts]
        ids = self.translate_ids(sources, forced_bos_token_id=forced, **search_options)
        translations = [self.tokenizer.decode(row) for row in ids]
        return translations[0] if single else translations
