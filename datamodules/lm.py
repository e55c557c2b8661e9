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

from common.errors import UserError
from datamodules.corpora import CORPORA, corpus_key, default_cache_dir, documents
from datamodules.probe import TokenProbe
from datamodules.synthetic import LANGUAGE, zipf_markov_tokens
from datamodules.tokenizer import TextTokenizer, load_tokenizer

SPLITS = ("train", "val")
SYNTHETIC_VAL_FRACTION = 0.1  # the tail of the stream; text corpora split by work instead


def windows(tokens: Tensor, length: int) -> Tensor:
    """The stream cut into consecutive non-overlapping windows of ``length`` tokens: [n, length] int64."""
    n = len(tokens) // length
    return tokens[:n * length].reshape(n, length).long()


class TrainBatches:
    """An endless stream of ``[batch_size, context_length + 1]`` windows at random offsets.

    Batch ``i`` is a function of ``(data_seed, i)`` only (numpy's SeedSequence mixes the pair; a torch
    Generator takes one integer). Under DDP, rank ``r`` of ``w`` takes global batch ``i * w + r``.

    ``len()`` is one epoch, about one pass over the tokens. Lightning needs the length for more than
    bookkeeping: from loaders without one it prefetches a batch ahead, so ``batches_seen`` would run one past
    the batches actually trained on when a checkpoint is written, and a resumed run would skip one.
    """

    def __init__(self, tokens: Tensor, batch_size: int, context_length: int, data_seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(tokens) < context_length + 1:
            raise UserError(f"train split has {len(tokens)} tokens, fewer than data.context_length + 1 = "
                            f"{context_length + 1}; lower data.context_length or use a larger corpus")
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.data_seed, self.rank, self.world_size = data_seed, rank, world_size
        self.batches_per_epoch = max(1, len(tokens) // (batch_size * context_length * world_size))
        self.batches_seen = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, i: int) -> Tensor:
        rng = np.random.default_rng([self.data_seed, i * self.world_size + self.rank])
        starts = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)
        index = torch.from_numpy(starts)[:, None] + torch.arange(self.context_length + 1)
        return self.tokens[index].long()

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


class LMDataModule(L.LightningDataModule):
    """Token streams of ``corpus`` (shakespeare, wikitext103, text_files, synthetic) for causal LM training.

    ``prepare_data`` downloads and tokenizes once into ``cache_dir``; ``setup`` loads the cached tokens.
    ``tokenizer``: ``{kind: bpe, vocab_size: 4096}`` or ``{kind: pretrained, name: ...}`` (text corpora).
    ``synthetic``: ``{vocab_size, n_tokens, zipf_exponent, seed}`` of the Zipfian Markov language.
    """

    def __init__(self, corpus: str = "shakespeare", path: str | None = None, cache_dir: str | None = None,
                 tokenizer: Mapping | None = None, synthetic: Mapping | None = None, context_length: int = 128,
                 batch_size: int = 16, data_seed: int = 0, probe_sequences: int = 150, probe_length: int = 128,
                 probe_seed: int = 0, val_batches: int | None = 32, num_workers: int = 0):
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
        self.corpus, self.path = corpus, path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer_spec = dict(tokenizer or {"kind": "bpe", "vocab_size": 4096})
        self.synthetic = {**LANGUAGE, **(synthetic or {})}
        self.context_length, self.batch_size, self.data_seed = context_length, batch_size, data_seed
        self.probe_sequences, self.probe_length, self.probe_seed = probe_sequences, probe_length, probe_seed
        self.val_batches, self.num_workers = val_batches, num_workers
        self._tokenizer: TextTokenizer | None = None
        self._tokens: dict[str, Tensor] = {}
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
        tmp = path.with_suffix(".tmp")
        torch.save(tokens, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a truncated cache behind
        return tokens

    @property
    def vocab_size(self) -> int:
        if self.corpus == "synthetic":
            return int(self.synthetic["vocab_size"])
        return self.tokenizer.vocab_size

    def model_kwargs(self) -> dict:
        """What the router takes from the data: train.py builds the model with these."""
        return {"vocab_size": self.vocab_size}

    # --- Lightning hooks ------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download, train the tokenizer, encode: once, on rank 0 (Lightning); later runs find the cache."""
        for split in SPLITS:
            self.tokens(split)

    def setup(self, stage: str | None = None) -> None:
        """Tokens into memory on every rank (from the cache that ``prepare_data`` filled)."""
        for split in SPLITS:
            self.tokens(split)

    @property
    def probe(self) -> TokenProbe:
        """The first ``probe_sequences`` non-overlapping ``probe_length`` windows of the validation stream."""
        if self._probe is None:
            probe = windows(self.tokens("val"), self.probe_length)[:self.probe_sequences]
            if len(probe) == 0:
                raise UserError(f"validation split has {len(self.tokens('val'))} tokens, fewer than one probe "
                                f"window; lower data.probe_length or use a larger corpus")
            if len(probe) < self.probe_sequences:
                warnings.warn(f"validation split holds only {len(probe)} probe windows of {self.probe_length} "
                              f"tokens, fewer than data.probe_sequences={self.probe_sequences}; using those")
            self._probe = TokenProbe.from_tokens(probe, seed=self.probe_seed)
        return self._probe

    def train_dataloader(self) -> TrainBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return TrainBatches(self.tokens("train"), self.batch_size, self.context_length, self.data_seed, rank, world)

    def val_dataloader(self) -> DataLoader:
        val = windows(self.tokens("val"), self.context_length + 1)
        if self.val_batches is not None:
            val = val[:self.val_batches * self.batch_size]
        return DataLoader(val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
