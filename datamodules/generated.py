"""Generated sequence tasks that give attention heads something to park on: every sequence starts with BOS.

- :class:`BigramBackcopy` (Guo et al. 2024, "Active-Dormant Attention Heads", arXiv 2410.13835): tokens
  follow a fixed random bigram chain, except that right after a *trigger* token the next token copies the
  token before the trigger. Heads that implement the copy have nothing to do off-trigger: the dormant phase
  in which they park on BOS.
- :class:`RepeatedSegments` (induction data, Olsson et al. 2022): a Zipfian Markov segment followed by an
  exact copy of its beginning.

The exact generative processes are in docs/data.md. Sequences are drawn fresh for every training batch
(batch ``i`` from ``(data_seed, i)``), so there is no epoch to memorise; validation and probe sequences
come from fixed streams of the task's own ``seed``, disjoint from every training stream.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from common.errors import UserError
from datamodules.lm import EndlessBatches
from datamodules.probe import TokenProbe
from datamodules.synthetic import zipf_markov_tokens

_VAL, _PROBE = 1, 2  # stream tags of the evaluation draws; training streams are seeded by data_seed instead


class BigramBackcopy:
    """Content tokens ``0..vocab_size-1``, BOS = ``vocab_size``.

    Transition row ``P[a] = softmax(sharpness * g_a)``, ``g_a ~ N(0, I)``; ``n_triggers`` trigger tokens
    drawn without replacement. A sequence: ``x_0 = BOS``; ``x_1`` uniform over non-trigger tokens; then
    ``x_{t+1} = x_{t-1}`` if ``x_t`` is a trigger, else ``x_{t+1} ~ P[x_t]``. Triggers are therefore never
    adjacent and a copied token is never a trigger (by induction from the non-trigger ``x_1``).
    """

    def __init__(self, vocab_size: int = 256, n_triggers: int = 4, sharpness: float = 2.0, seed: int = 0):
        if vocab_size < 2 or not 1 <= n_triggers < vocab_size or sharpness < 0:
            raise UserError(f"bigram_backcopy needs vocab_size >= 2, 1 <= n_triggers < vocab_size and "
                            f"sharpness >= 0; got {vocab_size}, {n_triggers}, {sharpness}")
        rng = np.random.default_rng([seed, 0])
        logits = sharpness * rng.standard_normal((vocab_size, vocab_size))
        transition = np.exp(logits - logits.max(1, keepdims=True))
        self.transition = transition / transition.sum(1, keepdims=True)
        self.cdf = np.cumsum(self.transition, axis=1)
        self.triggers = np.sort(rng.choice(vocab_size, size=n_triggers, replace=False))
        self.is_trigger = np.zeros(vocab_size, dtype=bool)
        self.is_trigger[self.triggers] = True
        self.starters = np.flatnonzero(~self.is_trigger)
        self.vocab_size, self.seed = vocab_size + 1, seed  # + BOS
        self.bos = vocab_size

    def sample(self, n: int, length: int, rng: np.random.Generator) -> Tensor:
        """``n`` sequences of ``length`` tokens (BOS included): [n, length] int64."""
        out = np.empty((n, length), dtype=np.int64)
        out[:, 0] = self.bos
        if length > 1:
            out[:, 1] = self.starters[rng.integers(0, len(self.starters), size=n)]
        uniforms = rng.random((n, max(0, length - 2)))
        for t in range(1, length - 1):
            current = out[:, t]
            # Inverse-CDF draw from each row; the clip guards the last bin against rounding of the cumsum.
            drawn = np.minimum((self.cdf[current] < uniforms[:, t - 1, None]).sum(1), self.bos - 1)
            out[:, t + 1] = np.where(self.is_trigger[current], out[:, t - 1], drawn)
        return torch.from_numpy(out)


class RepeatedSegments:
    """Content tokens of the Zipfian Markov language (``datamodules/synthetic.py``), BOS = ``vocab_size``.

    A sequence of ``length`` tokens: BOS, a segment ``S`` of ``s`` consecutive tokens taken at a uniform
    offset of the language's stream, then ``S[:r]`` with ``r = floor(repeat_fraction * (length - 1))`` and
    ``s = length - 1 - r`` (so ``repeat_fraction <= 0.5``). Training segments come from the first 90 % of
    the stream, evaluation segments from the rest.
    """

    def __init__(self, vocab_size: int = 1024, n_tokens: int = 300_000, zipf_exponent: float = 1.0,
                 repeat_fraction: float = 0.5, seed: int = 0):
        if not 0 <= repeat_fraction <= 0.5:
            raise UserError(f"repeat_fraction must lie in [0, 0.5] (the repeat copies part of the segment); "
                            f"got {repeat_fraction}")
        stream = zipf_markov_tokens(vocab_size, n_tokens, zipf_exponent, seed).long()
        n_val = max(1, n_tokens // 10)
        self.streams = {"train": stream[:-n_val], "val": stream[-n_val:]}
        self.repeat_fraction, self.seed = repeat_fraction, seed
        self.vocab_size, self.bos = vocab_size + 1, vocab_size

    def lengths(self, length: int) -> tuple[int, int]:
        """(segment, repeat) lengths of a ``length``-token sequence."""
        repeat = int(self.repeat_fraction * (length - 1))
        return length - 1 - repeat, repeat

    def sample(self, n: int, length: int, rng: np.random.Generator, split: str = "train") -> Tensor:
        stream = self.streams[split]
        segment, repeat = self.lengths(length)
        if len(stream) < segment:
            raise UserError(f"the {split} stream holds {len(stream)} tokens, fewer than one segment of {segment}; "
                            "raise data.generator.n_tokens")
        starts = torch.from_numpy(rng.integers(0, len(stream) - segment + 1, size=n))
        body = stream[starts[:, None] + torch.arange(segment)]
        bos = torch.full((n, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, body, body[:, :repeat]], dim=1)


class GeneratedBatches(EndlessBatches):
    """``[batch_size, context_length + 1]`` fresh sequences per batch, resumable like every train loader."""

    def __init__(self, generator, batch_size: int, context_length: int, data_seed: int, rank: int = 0,
                 world_size: int = 1, batches_per_epoch: int = 1000):
        super().__init__(data_seed, batches_per_epoch, rank, world_size)
        self.generator, self.batch_size, self.context_length = generator, batch_size, context_length

    def draw(self, rng: np.random.Generator) -> Tensor:
        return self.generator.sample(self.batch_size, self.context_length + 1, rng)


def evaluation_sequences(generator, n: int, length: int, tag: int) -> Tensor:
    """Fixed sequences from the task's own seed (``tag`` keeps validation and probe streams apart)."""
    rng = np.random.default_rng([generator.seed, 0xE7A1, tag])
    if isinstance(generator, RepeatedSegments):
        return generator.sample(n, length, rng, split="val")
    return generator.sample(n, length, rng)


class GeneratedDataModule(L.LightningDataModule):
    """A LightningDataModule over a sequence ``generator`` (:class:`BigramBackcopy` or :class:`RepeatedSegments`).

    Same interface as :class:`datamodules.lm.LMDataModule`: ``probe``, ``model_kwargs()``, the endless
    resumable train loader and a fixed validation set. The probe's shuffle null keeps BOS at position 0.
    """

    def __init__(self, generator, context_length: int = 128, batch_size: int = 16, data_seed: int = 0,
                 probe_sequences: int = 150, probe_length: int = 128, probe_seed: int = 0,
                 val_batches: int = 32, num_workers: int = 0):
        super().__init__()
        if data_seed < 0 or probe_seed < 0:
            raise UserError(f"data.data_seed and data.probe_seed must be >= 0; got {data_seed}, {probe_seed}")
        if context_length < 2 or probe_length < 2:
            raise UserError(f"generated sequences need context_length and probe_length >= 2 (BOS + a token); "
                            f"got {context_length}, {probe_length}")
        self.generator = generator
        self.context_length, self.batch_size, self.data_seed = context_length, batch_size, data_seed
        self.probe_sequences, self.probe_length, self.probe_seed = probe_sequences, probe_length, probe_seed
        self.val_batches, self.num_workers = val_batches, num_workers
        self.tokenizer = None  # token ids are the task's own symbols
        self._probe: TokenProbe | None = None

    @property
    def vocab_size(self) -> int:
        return self.generator.vocab_size

    @property
    def bos_id(self) -> int:
        return self.generator.bos

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.vocab_size}

    @property
    def probe(self) -> TokenProbe:
        if self._probe is None:
            tokens = evaluation_sequences(self.generator, self.probe_sequences, self.probe_length, _PROBE)
            self._probe = TokenProbe.from_tokens(tokens, seed=self.probe_seed, keep=1)
        return self._probe

    def train_dataloader(self) -> GeneratedBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return GeneratedBatches(self.generator, self.batch_size, self.context_length, self.data_seed, rank, world)

    def val_dataloader(self) -> DataLoader:
        val = evaluation_sequences(self.generator, self.val_batches * self.batch_size, self.context_length + 1, _VAL)
        return DataLoader(val, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
