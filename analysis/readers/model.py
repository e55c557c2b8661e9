"""Post-hoc signature of one model (our checkpoint or a Hugging Face one) on a probe, and its report files.

The measurement is the monitor's own (``collapse.measure.measure_signature``), so a post-hoc
number equals the number logged during training on the same probe. Reports go to one folder:

    signature.json   the full record (per layer, per head, summary), as a collapse.jsonl line
    signature.csv    one row per layer: every scalar column of the signature
    heads.csv        one row per (layer, head): max share and norm-CV, the pairs behind r(norm-CV, max share)
    summary.md       the paper's Table 1 row, the per-layer table, onset / L* / peak and r
    signature.png    the depth profiles (concentration, VE@r vs nulls pre/post-RoPE, norm-CV, CV vs share)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from analysis.reports.tables import markdown, table1_row, write_csv
from common import atomic
from common.constants import COMPLETION_THRESHOLD, ONSET_THRESHOLD, RANK, RANKS
from common.errors import UserError
from datamodules.probe import TokenProbe
from records import Record, layer_table, model_record, signature_table, unit_table
from routers.routing import routing_of, scored_keys_of


class _Probed(nn.Module):
    """What the monitor measures: a module with ``probe_routing(inputs)`` (here around a bare router)."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    @torch.no_grad()
    def probe_routing(self, inputs):
        return routing_of(self.router, inputs)

    @torch.no_grad()
    def probe_keys(self, inputs):
        return scored_keys_of(self.router, inputs)


class _WithProgress:
    """A probe whose batches show a progress bar: a big model's pass over 150 + 150 sequences takes minutes."""

    def __init__(self, probe: TokenProbe, desc: str):
        self.probe, self.desc = probe, desc

    def batches(self, batch_size: int):
        from common.progress import progress

        total = -(-len(self.probe.tokens) // batch_size)
        return progress(self.probe.batches(batch_size), self.desc, total)


def measure(router: nn.Module, probe: TokenProbe, ranks=RANKS, batch_size: int = 16, threshold: float = ONSET_THRESHOLD,
            completion: float = COMPLETION_THRESHOLD, name: str = "model"):
    from collapse.measure import measure_signature

    limit = getattr(router, "context_length", None)
    if limit is not None and probe.tokens.shape[1] > limit:
        raise UserError(f"probe windows of {probe.tokens.shape[1]} tokens exceed the model's context of {limit}; "
                        "pass probe_length=<= that with a corpus probe")
    vocab = vocabulary_size(router)
    if vocab is not None and probe.tokens.numel() and int(probe.tokens.max()) >= vocab:
        raise UserError(f"the probe holds token id {int(probe.tokens.max())}, outside the model's vocabulary of "
                        f"{vocab}: it was tokenised for another model; pass probe=<a corpus or folder> to tokenise "
                        f"it with this model's tokenizer (or tokenizer=<its tokenizer>)")
    return measure_signature(_Probed(router), _WithProgress(probe, f"{name}: probe"), ranks, batch_size, threshold,
                             completion)


def vocabulary_size(router: nn.Module) -> int | None:
    """The router's input vocabulary: its (first) token embedding's rows; None if it has none."""
    embedding = next((m for m in router.modules() if isinstance(m, nn.Embedding)), None)
    return None if embedding is None else embedding.num_embeddings


def probe_from_corpus(corpus: str, tokenizer, sequences: int, length: int, path: str | None = None) -> TokenProbe:
    """The first ``sequences`` non-overlapping ``length``-token windows of a corpus's validation text
    (WikiText-103 validation for the paper's numbers: lines joined, tokenised per model; docs/decisions.md)."""
    from datamodules.corpora import default_cache_dir, documents
    from datamodules.lm import windows

    if tokenizer is None:
        raise UserError("this model has no text tokenizer (trained on the synthetic language); pass probe=<probe.pt>")
    try:
        text = documents(corpus, "val", path, default_cache_dir())
    except UserError as e:  # its fix names train.py's keys (data.path, data=): keep the reason, name ours
        key = "probe" if corpus == "text_files" else "probe_path"
        reason = str(e).split(";")[0].replace("data.path", key)
        raise UserError(f"cannot read the probe text: {reason}; pass probe_path=<a local copy of the corpus>, "
                        "probe=<folder of .txt files> or probe=<probe.pt>") from None
    tokens = windows(tokenizer.encode_documents(text), length)
    if len(tokens) < sequences:
        raise UserError(f"{corpus} validation gives {len(tokens)} windows of {length} tokens, fewer than "
                        f"probe_sequences={sequences}; lower probe_sequences or probe_length")
    return TokenProbe.from_tokens(tokens[:sequences])


def resolve_probe(spec: str | None, default: Path | None, tokenizer: Callable, sequences: int, length: int,
                  path: str | None = None) -> tuple[TokenProbe, str]:
    """(probe, description): ``spec`` a probe file, a corpus name (``path``: a local copy of it) or a folder
    of .txt files, tokenised with ``tokenizer()`` (called only then); or, when None, the run's own saved
    probe at ``default``."""
    from datamodules.corpora import CORPORA

    if spec is None:
        if default is None:
            raise UserError("no probe: pass probe=wikitext103 (the paper's), probe=<probe.pt> or probe=<folder of .txt>")
        return TokenProbe.load(default), f"the run's probe ({default})"
    if spec.endswith(".pt"):
        return TokenProbe.load(spec), f"probe file {spec}"
    if spec in CORPORA and spec != "synthetic":
        probe = probe_from_corpus(spec, tokenizer(), sequences, length, path)
        return probe, f"{spec} validation, {sequences} x {length} tokens"
    if Path(spec).is_dir():
        probe = probe_from_corpus("text_files", tokenizer(), sequences, length, path=spec)
        return probe, f"text files in {spec} (validation split), {sequences} x {length} tokens"
    raise UserError(f"unknown probe {spec!r}; pass a probe .pt file, a folder of .txt files, or one of "
                    "wikitext103, shakespeare")


def write_report(signature, out: Path, name: str, about: str, step: int | None = None, threshold: float = ONSET_THRESHOLD,
                 completion: float = COMPLETION_THRESHOLD) -> Record:
    """Write the report files of one measured model into ``out``; returns the record (a collapse.jsonl line)."""
    from analysis.reports.figures import signature_figure

    out.mkdir(parents=True, exist_ok=True)

    record = model_record(step, name, about, signature)
    atomic.write_text(out / "signature.json", json.dumps(record, indent=1))
    write_csv(layer_table(record), out / "signature.csv")
    write_csv(unit_table(record), out / "heads.csv")
    rank = RANK if RANK in signature.ranks else max(signature.ranks)
    row = table1_row(name, record, threshold, completion, rank)
    summary = [f"# Collapse signature: {name}", "", f"Probe: {about}." + (f" Step {step}." if step is not None else ""),
               "", markdown([row]), "", "```", signature_table(signature), "```", "",
               f"r(norm-CV, max share) over (layer, head) pairs: {row['r']:.3f} (p = {row['r p']:.3g}).",
               f"Onset threshold {threshold}, completion threshold {completion}; depth % = layer index / L."]
    atomic.write_text(out / "summary.md", "\n".join(summary) + "\n")
    figure = signature_figure(record.layers, rank=rank, threshold=threshold, title=f"{name} - {about}")
    atomic.save_figure(figure, out / "signature.png", dpi=110)
    return record
