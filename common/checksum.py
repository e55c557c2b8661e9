"""A checkpoint's own integrity check, readable without Lightning (analysis loads checkpoints too)."""
from __future__ import annotations

import zlib

import torch

CHECKSUM = "tensor_crc32"  # a checkpoint's key: the CRC-32 of every tensor's bytes, in the order they are stored


def tensor_checksum(state, crc: int = 0, path: str = "") -> int:
    """CRC-32 over every tensor of a (nested) checkpoint: its place in the nesting and its bytes, in iteration
    order, ``CHECKSUM`` left out. Only tensors count, so editing metadata (hyperparameters, loop counters) does
    not read as corruption. torch.load reads a zip whose entries it does not verify: bytes flipped inside a
    tensor load silently."""
    if isinstance(state, torch.Tensor):
        data = state.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return zlib.crc32(data.numpy(), zlib.crc32(path.encode(), crc))
    if isinstance(state, dict):
        for key, value in state.items():
            if key != CHECKSUM:
                crc = tensor_checksum(value, crc, f"{path}/{key!r}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            crc = tensor_checksum(value, crc, f"{path}/{i}")
    return crc
