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

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from common.errors import UserError
from datamodules.lm import EndlessBatches
from datamodules.probe import TokenProbe
from datamodules.synthetic import zipf_markov_tokens, zipf_probabilities

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
    """Content tokens ``0..vocab_size-1`` (token 0 the most frequent), BOS = ``vocab_size``.

    A sequence of ``length`` tokens: BOS, a segment ``S`` of ``s`` tokens, then ``r = length - 1 - s`` tokens
    that repeat ``S`` from its start (tiled when ``r > s``). ``segment`` says where ``S`` comes from:
    ``markov`` -- ``s`` consecutive tokens of the Zipfian Markov language (``datamodules/synthetic.py``) at a
    uniform offset of its stream (training segments from the first 90 %, evaluation from the rest); ``iid`` --
    ``s`` independent draws of the Zipf law itself (``zipf_exponent = 0``: uniform), so nothing in the first
    half is learnable beyond the unigram and every nat the model gains comes from the copy.

    The repeat's length is set by ``repeat_fraction`` (``r = floor(f * (length - 1))``) or, instead, by
    ``idle_fraction``: the share of query positions with nothing to retrieve (BOS and the segment,
    ``(1 + s) / length``), so ``s = round(idle_fraction * length) - 1``.
    """

    def __init__(self, vocab_size: int = 1024, n_tokens: int = 300_000, zipf_exponent: float = 1.0,
                 repeat_fraction: float = 0.5, seed: int = 0, segment: str = "markov",
                 idle_fraction: float | None = None):
        if segment not in ("markov", "iid"):
            raise UserError(f"data.generator.segment must be markov or iid; got {segment!r}")
        if not 0 <= repeat_fraction < 1:
            raise UserError(f"repeat_fraction must lie in [0, 1) (at least one segment token); got {repeat_fraction}")
        if idle_fraction is not None and not 0 < idle_fraction <= 1:
            raise UserError(f"idle_fraction must lie in (0, 1] (BOS is always idle); got {idle_fraction}")
        if vocab_size < 2 or zipf_exponent < 0 or (segment == "markov" and zipf_exponent == 0):
            raise UserError(f"repeat data needs vocab_size >= 2 and zipf_exponent > 0 (>= 0 with segment=iid); "
                            f"got {vocab_size}, {zipf_exponent}")
        self.segment, self.zipf = segment, zipf_probabilities(vocab_size, zipf_exponent)
        self.streams = {}
        if segment == "markov":
            stream = zipf_markov_tokens(vocab_size, n_tokens, zipf_exponent, seed).long()
            n_val = max(1, n_tokens // 10)
            self.streams = {"train": stream[:-n_val], "val": stream[-n_val:]}
        self.repeat_fraction, self.idle, self.seed = repeat_fraction, idle_fraction, seed
        self.vocab_size, self.bos = vocab_size + 1, vocab_size

    def lengths(self, length: int) -> tuple[int, int]:
        """(segment, repeat) lengths of a ``length``-token sequence."""
        if self.idle is not None:
            segment = min(length - 1, max(1, round(self.idle * length) - 1))
        else:
            segment = length - 1 - int(self.repeat_fraction * (length - 1))
        return segment, length - 1 - segment

    def idle_fraction(self, length: int) -> float:
        """Share of the ``length`` query positions with nothing to retrieve: BOS and the segment's."""
        return (1 + self.lengths(length)[0]) / length

    def solved_loss(self, length: int) -> float:
        """The mean next-token loss (nats) of a model that knows the generator and copies perfectly, over the
        ``length - 1`` targets of a ``length``-token sequence: the segment's entropy, nothing for the repeat.
        Markov segments: the first token at the language's unigram entropy, the others at the Zipf entropy
        every state's next-token law has; i.i.d. segments: the Zipf entropy for each."""
        segment, _ = self.lengths(length)
        h_zipf = float(-(self.zipf * np.log(self.zipf)).sum())
        if self.segment == "iid":
            return segment * h_zipf / (length - 1)
        counts = np.bincount(self.streams["train"].numpy(), minlength=self.vocab_size - 1)
        unigram = counts[counts > 0] / counts.sum()
        h_unigram = float(-(unigram * np.log(unigram)).sum())
        return (h_unigram + (segment - 1) * h_zipf) / (length - 1)

    def sample(self, n: int, length: int, rng: np.random.Generator, split: str = "train") -> Tensor:
        segment, repeat = self.lengths(length)
        if self.segment == "iid":
            body = torch.from_numpy(rng.choice(len(self.zipf), size=(n, segment), p=self.zipf))
        else:
            stream = self.streams[split]
            if len(stream) < segment:
                raise UserError(f"the {split} stream holds {len(stream)} tokens, fewer than one segment of "
                                f"{segment}; raise data.generator.n_tokens")
            starts = torch.from_numpy(rng.integers(0, len(stream) - segment + 1, size=n))
            body = stream[starts[:, None] + torch.arange(segment)]
        bos = torch.full((n, 1), self.bos, dtype=torch.long)
        copy = body.repeat(1, -(-repeat // segment))[:, :repeat] if repeat else body[:, :0]
        return torch.cat([bos, body, copy], dim=1)


@dataclass(frozen=True)
class TaskLevels:
    """What a record carries about the task (None where the generator defines none): the validation loss of a
    model that has solved it, and the probe's share of queries with nothing to retrieve."""
    solved_loss: float | None = None
    idle_fraction: float | None = None


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
        self._levels: dict | None = None

    @property
    def vocab_size(self) -> int:
        return self.generator.vocab_size

    @property
    def bos_id(self) -> int:
        return self.generator.bos

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def task_levels(self) -> "TaskLevels":
        """What the records carry about the task: the validation loss at which it is solved and the probe's
        idle fraction (None where the generator defines none; docs/metrics.md: solved step, parking). Computed
        once: the monitor asks at every measurement."""
        if self._levels is None:
            solved, idle = getattr(self.generator, "solved_loss", None), getattr(self.generator, "idle_fraction", None)
            self._levels = TaskLevels(solved_loss=None if solved is None else solved(self.context_length + 1),
                                      idle_fraction=None if idle is None else idle(self.probe_length))
        return self._levels

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
