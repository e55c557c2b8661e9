"""A seeded Zipfian Markov language: token streams with known statistics, no tokenizer, generated in a second.

State = previous token. From every state the next token's *rank* is drawn from one Zipf law,
``p(r) ∝ (r + 1) ** -exponent``, and a state-specific permutation maps ranks to tokens. So every
conditional distribution has exactly the Zipf entropy, and what the previous token decides is *which* token
takes which rank.

Why the permutations only shuffle within octaves of rank (ranks 0 | 1-2 | 3-6 | 7-14 | ...): if every state
permuted all V tokens freely, the unigram distribution would be an average of V shuffled Zipf laws, nearly
flat. (An exactly Zipfian unigram is impossible with any two permutations differing: token 0 would need rank 0
in every state, then token 1 rank 1, and so on.) Shuffling within octaves keeps each octave's total
probability exactly Zipfian from every state, so the unigram frequencies fall on the Zipf line at the
resolution of an octave, while consecutive tokens still carry information about each other.

Token ids are global frequency ranks: token 0 is the most frequent.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError


LANGUAGE = dict(vocab_size=1024, n_tokens=300_000, zipf_exponent=1.0, seed=0)  # data=synthetic's defaults


def zipf_probabilities(vocab_size: int, exponent: float) -> np.ndarray:
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = ranks ** -exponent
    return p / p.sum()


def octave_permutations(vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """[V states, V ranks] -> token: each row a random permutation that keeps every rank in its octave."""
    octave = np.floor(np.log2(np.arange(vocab_size) + 1))
    # Sorting by (octave + uniform noise) orders the octaves and shuffles uniformly within each.
    return np.argsort(octave[None, :] + rng.random((vocab_size, vocab_size)), axis=1)


def zipf_markov_tokens(vocab_size: int, n_tokens: int, zipf_exponent: float, seed: int) -> Tensor:
    """An int32 stream of ``n_tokens`` tokens of the language fixed by (vocab_size, zipf_exponent, seed)."""
    if vocab_size < 2 or n_tokens < 2 or zipf_exponent <= 0:
        raise UserError(f"synthetic language needs vocab_size >= 2, n_tokens >= 2 and zipf_exponent > 0; got "
                        f"{vocab_size}, {n_tokens}, {zipf_exponent}")
    rng = np.random.default_rng(seed)
    next_token = octave_permutations(vocab_size, rng).ravel()
    ranks = rng.choice(vocab_size, size=n_tokens, p=zipf_probabilities(vocab_size, zipf_exponent))
    tokens = np.empty(n_tokens, dtype=np.int32)
    token = tokens[0] = ranks[0]  # the first token has no state: its rank is the token
    for i in range(1, n_tokens):  # a sequential chain; ~1 µs a token
        token = tokens[i] = next_token[token * vocab_size + ranks[i]]
    return torch.from_numpy(tokens)
