"""Resolved run configs as flat ``{"dotted.key": value}`` dicts, and back: the one place that flattens them
(checkpoint identity checks, sweep factors, W&B read-back and the analysis's logger settings all use it)."""
from __future__ import annotations


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"router": {"position": "rope"}} -> {"router.position": "rope"}`` (lists stay values)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    """The inverse of :func:`flatten`: ``{"router.position": "rope"} -> {"router": {"position": "rope"}}``."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested
