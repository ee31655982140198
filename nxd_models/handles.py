"""Front end: what from_pretrained_parallel returns, a handle on shards that live in worker processes.

`ParallelHandle` is what every family shares: the worker group, run(),
the checkpoint's tokenizer and generation config, close(). Each task adds
its calls on top: `ParallelModel` (causal LM: logits, generate, stream),
`ParallelEncoderModel` (BERT: logits or hidden states, classify) and
`ParallelSeq2SeqModel` (T5: encode, logits, generate). Every call reaches the
shards through `group.run` with a worker function of worker_ops.py or
generation/worker/.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from nxd_core.workers import Group, LocalGroup, StateKey

from .generation import generate as causal_generation
from .generation import seq2seq as seq2seq_generation
from .inputs import check_below, check_cache_position, check_mask, check_vocabulary, matching, token_batch
from .worker_ops import forward, release


class SessionLock:
    """One caller at a time per model: its KV cache (and a generation's session) is one.

    Other threads wait their turn. The thread that holds it (an unfinished stream)
    gets an error instead of a deadlock: a second session there would overwrite
    the first one's cache.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._reserved_by: str | None = None

    @contextmanager
    def held(self, what: str):
        if self._reserved_by is not None:
            raise RuntimeError(f"{what} is held by {self._reserved_by}: close it first, or submit to it")
        if self._owner == threading.get_ident():
            raise RuntimeError(
                f"{what} is still busy in this thread (an unfinished stream or generation): "
                "finish it or close it (generator.close()) before the next call"
            )
        self._lock.acquire()
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    @contextmanager
    def reserved(self, what: str, by: str):
        """Held for a long-lived owner (a serving engine): other callers get an error naming it
        at once instead of waiting, perhaps for ever, for it to end."""
        with self.held(what):
            self._reserved_by = by
            try:
                yield
            finally:
                self._reserved_by = None


class ParallelHandle:
    """A tensor parallel model whose shards live in worker processes (or in this torchrun rank)."""

    # Causal LMs pad prompts on the left (new tokens follow every row); encoders on the right (absolute positions).
    padding_side = "right"

    def __init__(
        self, group: Group, key: StateKey, config, path: Path, tp: int, dtype, max_batch_size: int, max_seq_len: int, owns_group: bool
    ):
        self.group, self.config, self.path, self.tp, self.dtype = group, config, path, tp, dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._key, self._owns_group, self._closed = key, owns_group, False
        self._tokenizer = self._generation_config = None
        self._session_lock = SessionLock()
        self.compiled_steps: set[str] = set()  # the compile cache names of the steps its workers hold compiled

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def exclusive(self, *others):
        """Hold this model (and others used with it, such as a draft) for one call or session;
        locks are taken in key order so that two threads can never wait on each other."""
        if self._closed:
            raise RuntimeError("this model is closed")
        models = sorted({id(m): m for m in (self, *others) if m is not None}.values(), key=lambda m: m.key.owner)
        with ExitStack() as stack:
            for model in models:
                stack.enter_context(model._session_lock.held(f"model {model.key.owner} ({model.path.name})"))
            yield

    @contextmanager
    def reserved(self, by: str):
        """Hold this model until the block ends for `by` (a serving engine); see SessionLock.reserved."""
        if self._closed:
            raise RuntimeError("this model is closed")
        with self._session_lock.reserved(f"model {self.key.owner} ({self.path.name})", by):
            yield

    @property
    def key(self) -> StateKey:
        """Where the shard lives in each worker's worker_state()."""
        return self._key

    @property
    def every_rank(self) -> bool:
        """Under torchrun each rank's script wants its own copy of results; in driver mode one crosses back."""
        return isinstance(self.group, LocalGroup)

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on every rank that holds a shard; this process's (or rank 0's) result."""
        if self._closed:
            raise RuntimeError("this model is closed")
        return self.group.run(fn, *args, **kwargs)[0]

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json"))

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers AutoTokenizer), padding on `padding_side` for batches."""
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise FileNotFoundError(f"no tokenizer in {self.path}: pass input_ids instead of text, or add the tokenizer files")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.path, padding_side=self.padding_side)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def generation_config(self):
        if self._generation_config is None and (self.path / "generation_config.json").exists():
            from transformers import GenerationConfig

            self._generation_config = GenerationConfig.from_pretrained(self.path)
        return self._generation_config

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_group:
            self.group.close()
        elif not self.group.closed:
            self.group.run(release, self._key)

    def _ids(self, input_ids, name: str = "input_ids") -> torch.Tensor:
        ids = token_batch(input_ids, name)
        check_vocabulary(ids, self.config.vocab_size, name)
        return ids

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if isinstance(self.group, LocalGroup):
            where = f"this process (torchrun rank {torch.distributed.get_rank()})"
        else:
            where = f"{self.group.world_size} worker processes (pids {self.group.pids})"
        state = ", closed" if self._closed else ""
        return (
            f"{type(self).__name__}({self.config.model_type}, {self.path}, tp={self.tp}, dtype={self.dtype}, "
            f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, shards in {where}{state})"
        )


# -- causal LMs (Llama) ---------------------------------------------------------------------------


class ParallelModel(ParallelHandle):
    """A causal LM (Llama): logits, generate and stream."""

    padding_side = "left"  # new tokens follow every row of a batch

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache_position=None) -> torch.Tensor:
        """Full-vocabulary logits [batch, seq, vocab] (see the family's forward for the arguments)."""
        input_ids = self._ids(input_ids)
        if cache_position is not None:
            cache_position, attention_mask = check_cache_position(
                cache_position, attention_mask, input_ids, self.max_batch_size, self.max_seq_len
            )
        else:
            attention_mask = check_mask(attention_mask, input_ids)
            if input_ids.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"{input_ids.shape[1]} tokens exceed this model's max_position_embeddings={self.config.max_position_embeddings}"
                )
        position_ids = matching(position_ids, input_ids, "position_ids")
        with self.exclusive():
            return self.run(
                forward,
                self.key,
                "__call__",
                self.every_rank,
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache_position=cache_position,
            )

    def generate(self, prompts=None, **kwargs):
        """Text or token generation; see nxd_models.generation.generate.generate for the arguments."""
        return causal_generation.generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Text pieces for one prompt as they are generated."""
        return causal_generation.stream(self, prompt, **kwargs)


# -- encoders (BERT) ------------------------------------------------------------------------------


class ParallelEncoderModel(ParallelHandle):
    """BERT-style encoders. Calling it returns what the checkpoint's head returns: sequence-classification
    logits [batch, num_labels], masked-LM logits [batch, seq, vocab], or the bare model's hidden states."""

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        input_ids = self._ids(input_ids)
        positions = self.config.max_position_embeddings
        if input_ids.shape[1] > positions:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed this model's max_position_embeddings={positions}; shorten the input")
        attention_mask = check_mask(attention_mask, input_ids)
        token_type_ids = matching(token_type_ids, input_ids, "token_type_ids")
        check_below(token_type_ids, self.config.type_vocab_size, "token_type_ids", "the config's type_vocab_size")
        with self.exclusive():
            return self.run(forward, self.key, "__call__", self.every_rank, input_ids, attention_mask, token_type_ids)

    def encode_text(self, texts, text_pairs=None) -> dict:
        """The tokenizer's input_ids, attention_mask and token_type_ids for a text (or pair) or a batch of them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if isinstance(text_pairs, str):
            text_pairs = [text_pairs]
        encoded = self.tokenizer(texts, text_pairs, return_tensors="pt", padding=True, truncation=True)
        return {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}

    def classify(self, texts, text_pairs=None) -> list[dict]:
        """Per text: {"label": the most likely of config.id2label, "probabilities": {label: p}}."""
        logits = self(**self.encode_text(texts, text_pairs))
        if logits.dim() != 2 or logits.shape[-1] != self.config.num_labels:
            raise ValueError(f"{self.path} is not a sequence classifier (architectures {self.config.architectures})")
        labels = [self.config.id2label[i] for i in range(logits.shape[-1])]
        results = []
        for row in logits.float().softmax(-1):
            probabilities = dict(zip(labels, row.tolist()))
            results.append({"label": labels[int(row.argmax())], "probabilities": probabilities})
        return results


# -- encoder-decoders (T5) --------------------------------------------------------------------------


class ParallelSeq2SeqModel(ParallelHandle):
    """T5-style encoder-decoders: encode(), logits for given decoder inputs, and generate()."""

    def _inputs(self, input_ids, attention_mask):
        input_ids = self._ids(input_ids)
        attention_mask = check_mask(attention_mask, input_ids)
        return input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The encoder's last hidden states [batch, seq, d_model]."""
        inputs = self._inputs(input_ids, attention_mask)
        with self.exclusive():
            return self.run(forward, self.key, "encode", self.every_rank, *inputs)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None) -> torch.Tensor:
        """Full-vocabulary logits [batch, decoder_seq, vocab] for decoder_input_ids (teacher forcing)."""
        if decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids (they start with config.decoder_start_token_id), or use generate()")
        inputs = self._inputs(input_ids, attention_mask)
        decoder_input_ids = self._ids(decoder_input_ids, "decoder_input_ids")
        if decoder_input_ids.shape[0] != inputs[0].shape[0]:
            raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows but input_ids has {inputs[0].shape[0]}")
        with self.exclusive():
            return self.run(forward, self.key, "__call__", self.every_rank, *inputs, decoder_input_ids)

    def generate(self, prompts=None, **kwargs):
        """Greedy, sampling or beam search; see nxd_models.generation.seq2seq.generate for the arguments."""
        return seq2seq_generation.generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Text pieces for one prompt as they are generated (greedy or sampling)."""
        return seq2seq_generation.stream(self, prompt, **kwargs)


# family.HANDLE -> the handle from_pretrained_parallel returns.
HANDLES = {"causal": ParallelModel, "encoder": ParallelEncoderModel, "seq2seq": ParallelSeq2SeqModel}
