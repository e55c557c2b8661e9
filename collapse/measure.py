"""Measuring: the signature of a module's routing on the probe set (what a record holds).

The monitor and the post-hoc analysis both call this, so a number measured after training equals the one
logged during training on the same probe.
"""
from __future__ import annotations

import torch

from collapse import SignatureAccumulator
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD, RANKS


@torch.no_grad()
def measure_signature(module, probe, ranks=RANKS, batch_size: int = 50, onset_threshold: float = ONSET_THRESHOLD,
                      completion_threshold: float = COMPLETION_THRESHOLD):
    """The signature of ``module.probe_routing`` on ``probe`` (and, where the probe has a position-shuffled
    copy, the shuffle null from ``module.probe_keys``), in eval mode, micro-batched; the module's train/eval
    mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        accumulator = SignatureAccumulator(ranks=tuple(ranks))
        for inputs, shuffled in probe.batches(batch_size):
            routing = module.probe_routing(inputs)
            accumulator.update(routing, None if shuffled is None else module.probe_keys(shuffled))
        return accumulator.compute(onset_threshold=onset_threshold, completion_threshold=completion_threshold)
    finally:
        module.train(was_training)

