"""Language-model data: token streams, random training windows, fixed validation windows, and the probe.

Two seeds, kept apart on purpose (the seed-direction study reseeds them separately):
- ``data_seed`` alone fixes the order of training batches. Batch ``i`` is drawn from a generator seeded by
  ``(data_seed, i)`` and nothing else, so the weight seed (``seed_everything``) never changes the data.
- ``probe_seed`` fixes the per-sequence position shuffle of the probe (the shuffle null's input).

Exact resume: the train loader counts the batches it has handed out and Lightning stores that count in
every checkpoint (``state_dict``/``load_state_dict``), so a run resumed after step ``k`` trains next on
batch ``k``, as the uninterrupted run did. Lightning restores loader state when training is bounded by
``max_steps`` (or the epoch was unfinished); the train loader is endless, so bound training by ``max_steps``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from common.atomic import atomic_path
from common.errors import UserError
from datamodules.corpora import CORPORA, corpus_key, default_cache_dir, documents
from datamodules.probe import TokenProbe
from datamodules.synthetic import LANGUAGE, zipf_markov_tokens
from datamodules.tokenizer import TextTokenizer, load_tokenizer

SPLITS = ("train", "val")
SYNTHETIC_VAL_FRACTION = 0.1  # the tail of the stream; text corpora split by work instead
ALIGN = ("none", "document", "paragraph")


def _save_atomic(obj, path: Path) -> None:
    # A per-process temp file beside the cache: two jobs filling one cache never collide, and a killed run
    # never leaves a truncated cache behind.
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def windows(tokens: Tensor, length: int, bos: int | None = None, starts: Tensor | None = None) -> Tensor:
    """Windows of ``length`` tokens: [n, length] int64. By default the stream cut into consecutive
    non-overlapping windows; with ``starts``, one window at each start that has room for a whole window.
    With ``bos``, every window is that token followed by ``length - 1`` tokens of the stream."""
    body = length - (bos is not None)
    if starts is None:
        n = len(tokens) // body
        cut = tokens[:n * body].reshape(n, body).long()
    else:
        starts = starts[starts <= len(tokens) - body]
        cut = tokens[starts[:, None] + torch.arange(body)].long()
    if bos is not None:
        cut = torch.cat([torch.full((len(cut), 1), bos, dtype=torch.long), cut], dim=1)
    return cut


def spaced(starts: Tensor | None, gap: int) -> Tensor | None:
    """The starts, greedily thinned so consecutive kept ones are ``gap`` apart: non-overlapping evaluation
    windows at unit starts."""
    if starts is None:
        return None
    kept, last = [], None
    for start in starts.tolist():
        if last is None or start >= last + gap:
            kept.append(start)
            last = start
    return torch.tensor(kept, dtype=torch.int64)


class EndlessBatches:
    """An endless, resumable stream of training batches: batch ``i`` is a function of ``(data_seed, i)`` only.

    Under DDP, rank ``r`` of ``w`` takes global batch ``i * w + r``. ``len()`` is one epoch. Lightning needs
    the length for more than bookkeeping: from loaders without one it prefetches a batch ahead, so
    ``batches_seen`` would run one past the batches actually trained on when a checkpoint is written, and a
    resumed run would skip one. Subclasses say what batch ``i`` is (:meth:`draw`).
    """

    def __init__(self, data_seed: int, batches_per_epoch: int, rank: int = 0, world_size: int = 1):
        self.data_seed, self.rank, self.world_size = data_seed, rank, world_size
        self.batches_per_epoch = max(1, batches_per_epoch)
        self.batches_seen = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rng(self, i: int) -> np.random.Generator:
        # numpy's SeedSequence mixes the pair; a torch Generator takes one integer.
        return np.random.default_rng([self.data_seed, i * self.world_size + self.rank])

    def draw(self, rng: np.random.Generator) -> Tensor:
        raise NotImplementedError

    def batch(self, i: int) -> Tensor:
        return self.draw(self.rng(i))

    def __iter__(self):
        # Epochs only re-enter here; the count lives on the loader, so batch order runs on across them.
        while True:
            batch = self.batch(self.batches_seen)
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state["batches_seen"])


class TrainBatches(EndlessBatches):
    """``[batch_size, context_length + 1]`` windows of a token stream at random offsets (``starts=None``)
    or at offsets drawn from ``starts`` (``data.align``: document or paragraph starts); with ``bos``, each
    window is BOS followed by ``context_length`` stream tokens."""

    def __init__(self, tokens: Tensor, batch_size: int, context_length: int, data_seed: int,
                 rank: int = 0, world_size: int = 1, bos: int | None = None, starts: Tensor | None = None):
        body = context_length + 1 - (bos is not None)
        if len(tokens) < body:
            raise UserError(f"train split has {len(tokens)} tokens, fewer than data.context_length + 1 = "
                            f"{context_length + 1}; lower data.context_length or use a larger corpus")
        super().__init__(data_seed, len(tokens) // (batch_size * context_length * world_size), rank, world_size)
        self.tokens, self.batch_size, self.context_length, self.bos, self.body = tokens, batch_size, context_length, bos, body
        self.starts = None if starts is None else starts[starts <= len(tokens) - body]
        if self.starts is not None and len(self.starts) == 0:
            raise UserError(f"no document/paragraph of the train split starts a whole window of {body} tokens; "
                            "use data.align=none or a shorter data.context_length")

    def draw(self, rng: np.random.Generator) -> Tensor:
        if self.starts is None:
            starts = torch.from_numpy(rng.integers(0, len(self.tokens) - self.body + 1, size=self.batch_size))
        else:
            starts = self.starts[torch.from_numpy(rng.integers(0, len(self.starts), size=self.batch_size))]
        return windows(self.tokens, self.context_length + 1, self.bos, starts)


class LMDataModule(L.LightningDataModule):
    """Token streams of ``corpus`` (shakespeare, wikitext103, text_files, synthetic) for causal LM training.

    ``prepare_data`` downloads and tokenizes once into ``cache_dir``; ``setup`` loads the cached tokens.
    ``tokenizer``: ``{kind: bpe, vocab_size: 4096}`` or ``{kind: pretrained, name: ...}`` (text corpora).
    ``synthetic``: ``{vocab_size, n_tokens, zipf_exponent, seed}`` of the Zipfian Markov language.
    ``bos``: every training, validation and probe window starts with a reserved BOS token (id = the
    tokenizer's vocabulary size, so the model's vocabulary grows by one). ``align``: where training and
    validation windows start: ``none`` (random offsets / consecutive windows), ``document`` or ``paragraph``.
    """

    def __init__(self, corpus: str = "shakespeare", path: str | None = None, cache_dir: str | None = None,
                 tokenizer: Mapping | None = None, synthetic: Mapping | None = None, context_length: int = 128,
                 batch_size: int = 16, data_seed: int = 0, probe_sequences: int = 150, probe_length: int = 128,
                 probe_seed: int = 0, val_batches: int | None = 32, num_workers: int = 0, bos: bool = False,
                 align: str = "none"):
        super().__init__()
        if corpus not in CORPORA:
            raise UserError(f"unknown data.corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
        if data_seed < 0 or probe_seed < 0:
            raise UserError(f"data.data_seed and data.probe_seed must be >= 0; got {data_seed}, {probe_seed}")
        if corpus == "text_files" and not path:
            raise UserError("data=text_files needs a folder of .txt files: set data.path=/that/folder")
        unknown = set(synthetic or {}) - set(LANGUAGE)
        if unknown:
            raise UserError(f"unknown data.synthetic keys {sorted(unknown)}; use {', '.join(LANGUAGE)}")
        if align not in ALIGN:
            raise UserError(f"unknown data.align {align!r}; choose one of {', '.join(ALIGN)}")
        if align != "none" and corpus == "synthetic":
            raise UserError("data=synthetic is one endless stream with no documents; use data.align=none "
                            "(or data=repeat / data=bigram_backcopy for sequences with a start)")
        self.corpus, self.path, self.bos, self.align = corpus, path, bool(bos), align
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer_spec = dict(tokenizer or {"kind": "bpe", "vocab_size": 4096})
        self.synthetic = {**LANGUAGE, **(synthetic or {})}
        self.context_length, self.batch_size, self.data_seed = context_length, batch_size, data_seed
        self.probe_sequences, self.probe_length, self.probe_seed = probe_sequences, probe_length, probe_seed
        self.val_batches, self.num_workers = val_batches, num_workers
        self._tokenizer: TextTokenizer | None = None
        self._tokens: dict[str, Tensor] = {}
        self._starts: dict[str, dict[str, Tensor]] = {}
        self._probe: TokenProbe | None = None

    # --- tokens ---------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """None for the synthetic language, whose tokens are its own ids."""
        if self.corpus == "synthetic":
            return None
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec, self.corpus_dir,
                                             lambda: documents(self.corpus, "train", self.path, self.cache_dir))
        return self._tokenizer

    @property
    def corpus_dir(self) -> Path:
        return self.cache_dir / corpus_key(self.corpus, self.path)

    def tokens(self, split: str) -> Tensor:
        """The split's int32 token stream, encoded once and cached beside the tokenizer."""
        if split not in self._tokens:
            if self.corpus == "synthetic":
                stream = zipf_markov_tokens(**self.synthetic)
                n_val = max(1, round(SYNTHETIC_VAL_FRACTION * len(stream)))
                self._tokens = {"train": stream[:-n_val], "val": stream[-n_val:]}
            else:
                self._tokens[split] = self._cached_tokens(split)
        return self._tokens[split]

    def _cached_tokens(self, split: str) -> Tensor:
        path = self.corpus_dir / f"tokens-{self.tokenizer.key}-{split}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        tokens = self.tokenizer.encode_documents(documents(self.corpus, split, self.path, self.cache_dir))
        _save_atomic(tokens, path)
        return tokens

    def starts(self, split: str) -> Tensor | None:
        """Token offsets where the split's ``align`` units begin (None for ``align=none``), cached."""
        if self.align == "none":
            return None
        if split not in self._starts:
            path = self.corpus_dir / f"starts-{self.tokenizer.key}-{split}.pt"
            if path.exists():
                self._starts[split] = torch.load(path, weights_only=True)
            else:
                tokens, starts = self.tokenizer.encode_documents_with_starts(
                    documents(self.corpus, split, self.path, self.cache_dir))
                if not torch.equal(tokens, self.tokens(split)):
                    raise UserError(f"cached tokens of {self.corpus} differ from a fresh encoding; delete "
                                    f"{self.corpus_dir} and run again")
                _save_atomic(starts, path)
                self._starts[split] = starts
        return self._starts[split][self.align]

    @property
    def bos_id(self) -> int | None:
        """The reserved BOS id (one past the tokenizer's vocabulary), or None without ``bos``."""
        if not self.bos:
            return None
        return int(self.synthetic["vocab_size"]) if self.corpus == "synthetic" else self.tokenizer.vocab_size

    @property
    def vocab_size(self) -> int:
        base = int(self.synthetic["vocab_size"]) if self.corpus == "synthetic" else self.tokenizer.vocab_size
        return base + self.bos

    def model_kwargs(self) -> dict:
        """What the router takes from the data: train.py builds the model with these."""
        return {"vocab_size": self.vocab_size}

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download, train the tokenizer, encode: once, on rank 0 (Lightning); later runs find the cache."""
        for split in SPLITS:
            self.tokens(split)
            self.starts(split)

    def setup(self, stage: str | None = None) -> None:
        """Tokens into memory on every rank (from the cache that ``prepare_data`` filled)."""
        for split in SPLITS:
            self.tokens(split)
            self.starts(split)

    @property
    def probe(self) -> TokenProbe:
        """The first ``probe_sequences`` ``probe_length`` windows of the validation stream (consecutive, or
        at the ``align`` starts), each opening with BOS under ``bos``."""
        if self._probe is None:
            body = self.probe_length - self.bos
            probe = windows(self.tokens("val"), self.probe_length, self.bos_id, spaced(self.starts("val"), body))
            probe = probe[:self.probe_sequences]
            if len(probe) == 0:
                raise UserError(f"validation split has {len(self.tokens('val'))} tokens, fewer than one probe "
                                f"window; lower data.probe_length or use a larger corpus")
            if len(probe) < self.probe_sequences:
                warnings.warn(f"validation split holds only {len(probe)} probe windows of {self.probe_length} "
                              f"tokens, fewer than data.probe_sequences={self.probe_sequences}; using those")
            self._probe = TokenProbe.from_tokens(probe, seed=self.probe_seed, keep=int(self.bos))
        return self._probe

    def train_dataloader(self) -> TrainBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TrainBatches(self.tokens("train"), self.batch_size, self.context_length, self.data_seed, rank, world,
                            self.bos_id, self.starts("train"))

    def val_dataloader(self) -> DataLoader:
        body = self.context_length + 1 - self.bos
        val = windows(self.tokens("val"), self.context_length + 1, self.bos_id, spaced(self.starts("val"), body))
        if self.val_batches is not None:
            val = val[:self.val_batches * self.batch_size]
        return DataLoader(val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
