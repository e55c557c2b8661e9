"""Text to token ids: a byte-level BPE trained on the corpus's train split, or a pretrained Hugging Face tokenizer.

Byte-level BPE (GPT-2's scheme) round-trips any text, seen or not: unknown characters fall back to their UTF-8
bytes. No special tokens are added to the stream: windows are cut from one running token stream, and the
default measures without a BOS token (docs/decisions.md). ``data.bos=true`` prepends a reserved BOS id, one
past the tokenizer's vocabulary, when windows are cut (``datamodules/lm.py``), not here.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from common.atomic import atomic_path
from common.errors import UserError
from datamodules.corpora import hub_reachable

KINDS = ("bpe", "pretrained")
_ENCODE_CHARS = 8_000_000  # documents are encoded in groups of about this many characters to bound memory


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` tokens (fewer when the text has fewer pairs to merge)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


class TextTokenizer:
    """One interface over both kinds: ``encode``, ``encode_documents``, ``decode``, ``vocab_size``, ``key``."""

    def __init__(self, backend, key: str):
        self.backend = backend  # a tokenizers.Tokenizer or a transformers tokenizer
        self.key = key  # names the encoded-token cache: a different tokenizer never reads another's tokens

    @property
    def vocab_size(self) -> int:
        if isinstance(self.backend, Tokenizer):
            return self.backend.get_vocab_size()
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        return self._encode_batch([text])[0]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if isinstance(self.backend, Tokenizer):
            return self.backend.decode(ids)
        return self.backend.decode(ids, clean_up_tokenization_spaces=False)

    def encode_documents(self, documents: list[str]) -> Tensor:
        """The documents' tokens in order, as one int32 stream (vocabularies stay far below 2**31)."""
        parts = [np.asarray(ids, dtype=np.int32) for group in _groups(documents) for ids in self._encode_batch(group)]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))

    def encode_documents_with_starts(self, documents: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The stream of :meth:`encode_documents` and where its units start, as token offsets:
        ``{"document": ..., "paragraph": ...}`` (a paragraph starts the text and follows every blank line).
        ``data.align`` cuts training windows at these offsets."""
        parts, starts, offset = [], {"document": [], "paragraph": []}, 0
        for group in _groups(documents):
            for text, (ids, spans) in zip(group, self._encode_batch(group, offsets=True)):
                starts["document"].append(offset)
                starts["paragraph"] += [offset + i for i in _paragraph_tokens(text, spans)]
                parts.append(np.asarray(ids, dtype=np.int32))
                offset += len(ids)
        tokens = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))
        return tokens, {unit: torch.tensor(sorted(set(s)), dtype=torch.int64) for unit, s in starts.items()}

    def _encode_batch(self, texts: list[str], offsets: bool = False) -> list:
        """Token ids per text; with ``offsets``, (ids, [(char start, char end), ...]) per text."""
        if not texts:
            return []
        if isinstance(self.backend, Tokenizer):
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e.offsets) if offsets else e.ids for e in encodings]
        out = self.backend(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=offsets)
        return list(zip(out["input_ids"], out["offset_mapping"])) if offsets else out["input_ids"]


def _groups(documents: list[str]):
    """Consecutive documents in groups of about ``_ENCODE_CHARS`` characters (bounded encoder memory)."""
    group, size = [], 0
    for doc in documents:
        if group and size + len(doc) > _ENCODE_CHARS:
            yield group
            group, size = [], 0
        group.append(doc)
        size += len(doc)
    if group:
        yield group


_BLANK_LINE = re.compile(r"\n[ \t\r]*\n\s*")


def _paragraph_tokens(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the first token at or after each paragraph's first character."""
    chars = [0] + [m.end() for m in _BLANK_LINE.finditer(text) if m.end() < len(text)]
    token_starts = [start for start, _ in spans]
    return sorted({i for i in (bisect.bisect_left(token_starts, c) for c in chars) if i < len(spans)})


def load_tokenizer(spec: Mapping, cache_dir: Path, train_documents: Callable[[], list[str]]) -> TextTokenizer:
    """The tokenizer ``spec`` names; a BPE is trained once on ``train_documents()`` and cached in ``cache_dir``.

    ``spec``: ``{kind: bpe, vocab_size: 4096}`` or ``{kind: pretrained, name: <local path or hub name>}``.
    """
    kind = spec.get("kind", "bpe")
    if kind == "bpe":
        vocab_size = int(spec.get("vocab_size") or 4096)
        if vocab_size < 256:
            raise UserError(f"tokenizer.vocab_size={vocab_size} is below the 256 byte tokens; use at least 256")
        path = Path(cache_dir) / f"bpe{vocab_size}.json"
        if path.exists():
            return TextTokenizer(Tokenizer.from_file(str(path)), path.stem)
        tokenizer = train_bpe(train_documents(), vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tokenizer.save(str(tmp))
        return TextTokenizer(tokenizer, path.stem)
    if kind == "pretrained":
        return TextTokenizer(pretrained(spec.get("name")), "hf-" + str(spec.get("name")).strip("/").replace("/", "--"))
    raise UserError(f"unknown tokenizer.kind {kind!r}; choose one of {', '.join(KINDS)}")


def pretrained(name: str | None):
    """``AutoTokenizer`` from a local folder, or from the Hub cache (downloading only when the Hub answers)."""
    if not name:
        raise UserError("tokenizer.kind=pretrained needs tokenizer.name=<local folder or hub name, e.g. gpt2>")
    from transformers import AutoTokenizer

    local = Path(name).expanduser().is_dir()
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local or not hub_reachable())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r} ({type(e).__name__}); pass a local folder as "
                        "tokenizer.name, download it online once into the Hugging Face cache, or use "
                        "tokenizer.kind=bpe") from None
