"""Data that can anchor a sink: BOS and aligned windows on text corpora, Bigram-Backcopy, repeated segments."""
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from datamodules.generated import BigramBackcopy, GeneratedBatches, GeneratedDataModule, RepeatedSegments
from datamodules.lm import LMDataModule, spaced, windows

PARAGRAPHS = ["ROMEO.\nBut soft, what light through yonder window breaks?",
              "JULIET.\nO Romeo, Romeo, wherefore art thou Romeo?",
              "Enter Nurse.",
              "NURSE.\nMadam, your mother craves a word with you, and with all haste, I pray you."]


@pytest.fixture
def play_folder(tmp_path):
    """Ten 'works' of blank-line separated speeches (text_files splits one file in ten off to validation)."""
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(10):
        (folder / f"play{i}.txt").write_text("\n\n".join(PARAGRAPHS * 12) + "\n")
    return folder


def text_dm(folder, tmp_path, **kwargs):
    dm = LMDataModule(corpus="text_files", path=str(folder), cache_dir=tmp_path / "cache",
                      tokenizer={"kind": "bpe", "vocab_size": 300}, context_length=24, batch_size=8,
                      probe_sequences=6, probe_length=16, val_batches=2, **kwargs)
    dm.prepare_data()
    return dm


# --- BOS and alignment on text corpora ----------------------------------------------------------------------

def test_bos_opens_every_train_val_and_probe_window_and_is_a_reserved_id(play_folder, tmp_path):
    dm = text_dm(play_folder, tmp_path, bos=True)
    bos = dm.tokenizer.vocab_size
    assert dm.bos_id == bos and dm.vocab_size == bos + 1 and int(dm.tokens("train").max()) < bos
    train = dm.train_dataloader().batch(0)
    val = next(iter(dm.val_dataloader()))
    assert train.shape == (8, 25) and val.shape[1] == 25
    for part in (train, val, dm.probe.tokens, dm.probe.shuffled):
        assert (part[:, 0] == bos).all() and (part[:, 1:] != bos).all()


def test_bos_windows_continue_the_stream_after_the_bos_token(play_folder, tmp_path):
    plain, with_bos = text_dm(play_folder, tmp_path), text_dm(play_folder, tmp_path, bos=True)
    stream = plain.tokens("train")
    batch = with_bos.train_dataloader().batch(3)
    for row in batch:  # every window body is a contiguous slice of the train stream
        body = row[1:]
        starts = [s for s in range(len(stream) - len(body) + 1) if torch.equal(stream[s:s + len(body)].long(), body)]
        assert starts


def test_shuffle_null_keeps_bos_in_place_and_permutes_the_rest(play_folder, tmp_path):
    probe = text_dm(play_folder, tmp_path, bos=True).probe
    assert torch.equal(probe.shuffled[:, 0], probe.tokens[:, 0])
    for real, shuffled in zip(probe.tokens, probe.shuffled):
        assert torch.equal(real[1:].sort().values, shuffled[1:].sort().values)
    assert not torch.equal(probe.tokens, probe.shuffled)


def test_paragraph_alignment_starts_every_window_at_a_paragraph(play_folder, tmp_path):
    dm = text_dm(play_folder, tmp_path, bos=True, align="paragraph")
    starts = dm.starts("train")
    assert len(starts) == 9 * 48  # 48 paragraphs in each of the 9 train files
    for row in dm.train_dataloader().batch(0):
        text = dm.tokenizer.decode(row[1:])
        assert any(text.startswith(p[:12]) for p in PARAGRAPHS), text
    documents = text_dm(play_folder, tmp_path, bos=True, align="document")
    assert len(documents.starts("train")) == 9
    for row in documents.train_dataloader().batch(0):
        assert dm.tokenizer.decode(row[1:]).startswith("ROMEO.")


def test_aligned_evaluation_windows_do_not_overlap():
    starts = torch.tensor([0, 3, 10, 12, 25, 26, 40])
    assert spaced(starts, 10).tolist() == [0, 10, 25, 40]
    cut = windows(torch.arange(48), 11, bos=99, starts=spaced(starts, 10))  # 40 + 10 > 48: no room at 40
    assert cut[:, 0].tolist() == [99, 99, 99] and cut[:, 1].tolist() == [0, 10, 25] and cut.shape[1] == 11


def test_alignment_of_an_endless_stream_is_refused():
    with pytest.raises(UserError, match="align=none"):
        LMDataModule(corpus="synthetic", align="document")
    with pytest.raises(UserError, match="choose one of"):
        LMDataModule(corpus="synthetic", align="sentence")


# --- Bigram-Backcopy ---------------------------------------------------------------------------------------------

def test_bigram_rows_are_distributions_and_triggers_are_distinct_content_tokens():
    task = BigramBackcopy(vocab_size=50, n_triggers=5, sharpness=1.5, seed=3)
    assert np.allclose(task.transition.sum(1), 1.0) and (task.transition > 0).all()
    assert len(set(task.triggers.tolist())) == 5 and task.triggers.max() < 50
    assert task.bos == 50 and task.vocab_size == 51


def test_after_every_trigger_the_token_before_it_is_copied_exactly():
    task = BigramBackcopy(vocab_size=20, n_triggers=4, seed=1)
    x = task.sample(200, 64, np.random.default_rng(0)).numpy()
    assert (x[:, 0] == task.bos).all() and (x[:, 1:] != task.bos).all()
    trigger = task.is_trigger[x[:, 1:-1]]
    copied = x[:, 2:] == x[:, :-2]
    assert trigger.sum() > 500 and copied[trigger].all()
    assert not (trigger[:, 1:] & trigger[:, :-1]).any()  # triggers are never adjacent


def test_off_trigger_transitions_follow_the_bigram_matrix():
    task = BigramBackcopy(vocab_size=8, n_triggers=1, sharpness=1.0, seed=0)
    x = task.sample(4000, 40, np.random.default_rng(1)).numpy()
    previous, following = x[:, 1:-1].ravel(), x[:, 2:].ravel()
    state = int(np.setdiff1d(np.arange(8), task.triggers)[0])
    counts = np.bincount(following[previous == state], minlength=8)
    empirical = counts / counts.sum()
    assert counts.sum() > 5000 and 0.5 * np.abs(empirical - task.transition[state]).sum() < 0.03


def test_bigram_language_is_fixed_by_its_seed():
    a, b, c = BigramBackcopy(seed=0), BigramBackcopy(seed=0), BigramBackcopy(seed=1)
    assert np.array_equal(a.transition, b.transition) and np.array_equal(a.triggers, b.triggers)
    assert not np.array_equal(a.transition, c.transition)


# --- repeated segments -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, length, segment, repeat", [(0.5, 129, 64, 64), (0.5, 128, 64, 63),
                                                               (0.25, 129, 96, 32), (0.0, 17, 16, 0)])
def test_repeat_copies_the_first_tokens_of_the_segment(fraction, length, segment, repeat):
    task = RepeatedSegments(vocab_size=64, n_tokens=5000, repeat_fraction=fraction)
    x = task.sample(16, length, np.random.default_rng(0))
    assert task.lengths(length) == (segment, repeat) and x.shape == (16, length)
    assert (x[:, 0] == 64).all()
    assert torch.equal(x[:, 1 + segment:], x[:, 1:1 + repeat])
    stream = task.streams["train"]
    for row in x[:4]:  # the segment is a contiguous piece of the language's train stream
        body = row[1:1 + segment]
        assert any(torch.equal(stream[s:s + segment], body) for s in range(len(stream) - segment + 1))


def test_a_repeat_longer_than_its_segment_tiles_it_and_bad_fractions_are_refused():
    task = RepeatedSegments(vocab_size=64, n_tokens=5000, repeat_fraction=0.75)
    x = task.sample(8, 129, np.random.default_rng(0))
    segment, repeat = task.lengths(129)
    assert (segment, repeat) == (32, 96)
    tokens = x[:, 1:]
    assert torch.equal(tokens[:, segment:], tokens[:, :repeat])  # period = segment: a tiled copy
    for bad in (dict(repeat_fraction=1.0), dict(idle_fraction=0.0), dict(segment="shuffled"),
                dict(zipf_exponent=0.0)):
        with pytest.raises(UserError, match=next(iter(bad))):
            RepeatedSegments(vocab_size=64, n_tokens=5000, **bad)


@pytest.mark.parametrize("idle, length, segment", [(0.25, 128, 31), (0.5, 128, 63), (0.75, 128, 95)])
def test_idle_fraction_sets_the_segment_and_is_the_share_of_queries_with_nothing_to_copy(idle, length, segment):
    task = RepeatedSegments(vocab_size=64, n_tokens=5000, idle_fraction=idle)
    assert task.lengths(length) == (segment, length - 1 - segment)
    assert task.idle_fraction(length) == idle == (1 + segment) / length
    # Independently: query t can retrieve its next token iff it sits in the copy (its own token repeats one
    # ``segment`` back, so the next one does too); BOS and the segment's queries have nothing to look up.
    x = task.sample(1, length, np.random.default_rng(1))[0]
    active = sum(1 for t in range(segment + 1, length) if x[t] == x[t - segment])
    assert 1 - active / length == pytest.approx(idle)


def test_iid_segments_draw_the_zipf_law_and_the_solved_loss_is_the_segment_entropy():
    task = RepeatedSegments(vocab_size=16, segment="iid", zipf_exponent=1.0, repeat_fraction=0.5)
    x = task.sample(20000, 9, np.random.default_rng(0))  # BOS, 4 drawn, 4 copied
    drawn = x[:, 1:5].reshape(-1)
    frequencies = torch.bincount(drawn, minlength=16).double() / drawn.numel()
    p = torch.tensor(task.zipf)
    assert torch.allclose(frequencies, p, atol=0.01)
    # A model that knows p and copies perfectly: -log p per drawn target, 0 per copied one, 8 targets.
    expected = float(-(p * p.log()).sum()) * 4 / 8
    assert task.solved_loss(9) == pytest.approx(expected, rel=1e-12)
    # The same level measured as the cross-entropy of that ideal predictor on the samples.
    ideal = -torch.log(p[drawn]).sum() / (x.shape[0] * 8)
    assert float(ideal) == pytest.approx(expected, rel=0.02)
    uniform = RepeatedSegments(vocab_size=16, segment="iid", zipf_exponent=0.0)
    assert uniform.solved_loss(9) == pytest.approx(math.log(16) * 4 / 8)


def test_markov_solved_loss_counts_the_first_token_at_the_unigram_and_the_rest_at_the_zipf_entropy():
    task = RepeatedSegments(vocab_size=32, n_tokens=20000, repeat_fraction=0.5)
    counts = torch.bincount(task.streams["train"], minlength=32).double()
    u = counts[counts > 0] / counts.sum()
    h_uni, h_zipf = float(-(u * u.log()).sum()), float(-(torch.tensor(task.zipf) * torch.tensor(task.zipf).log()).sum())
    segment, _ = task.lengths(129)
    assert task.solved_loss(129) == pytest.approx((h_uni + (segment - 1) * h_zipf) / 128, rel=1e-12)


# --- the datamodule -----------------------------------------------------------------------------------------------

def test_generated_batches_depend_on_data_seed_and_index_only_and_resume_exactly():
    task = BigramBackcopy(vocab_size=30, seed=0)
    loader = GeneratedBatches(task, 4, 16, data_seed=7)
    stream = iter(loader)
    first = [next(stream) for _ in range(5)]
    resumed = GeneratedBatches(task, 4, 16, data_seed=7)
    resumed.load_state_dict({"batches_seen": 3})
    assert torch.equal(next(iter(resumed)), first[3])
    assert not torch.equal(GeneratedBatches(task, 4, 16, data_seed=8).batch(0), first[0])
    assert loader.state_dict() == {"batches_seen": 5}


def test_evaluation_sequences_are_fixed_and_not_training_sequences():
    dm = GeneratedDataModule(RepeatedSegments(vocab_size=64, n_tokens=20000), context_length=32, batch_size=4,
                             probe_sequences=8, probe_length=32, val_batches=2)
    again = GeneratedDataModule(RepeatedSegments(vocab_size=64, n_tokens=20000), context_length=32, batch_size=4,
                                probe_sequences=8, probe_length=32, val_batches=2, data_seed=3)
    assert torch.equal(dm.probe.tokens, again.probe.tokens)  # data_seed moves training only
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (8, 33) and (val[:, 0] == 64).all() and (dm.probe.tokens[:, 0] == 64).all()
    assert (dm.probe.shuffled[:, 0] == 64).all()
    assert not torch.equal(val[:4], dm.train_dataloader().batch(0))
    assert dm.model_kwargs() == {"vocab_size": 65}


@pytest.mark.parametrize("name", ["bigram_backcopy", "repeat"])
def test_data_configs_instantiate_the_generators(name):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", "data_seed=2"])  # the file and its base/windows
    dm = instantiate(cfg.data)
    assert isinstance(dm, GeneratedDataModule) and dm.data_seed == 2
    assert dm.probe.tokens.shape == (150, 128) and (dm.probe.tokens[:, 0] == dm.bos_id).all()


def test_tiny_run_on_bigram_backcopy_records_onset_step_sink_source_and_loss(tiny_run):
    out, _ = tiny_run("data=bigram_backcopy", "data.generator.vocab_size=32", "data.context_length=32",
                      "data.batch_size=4", "data.probe_sequences=8", "data.probe_length=32", "data.val_batches=2",
                      "logger=csv", "callbacks.collapse_monitor.onset_threshold=0.05")
    records = [json.loads(line) for line in (out / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10, 20]
    # causal routing over 32 sources: source 0's share is H_32/32 = 0.127 > 0.05 from step 0 on
    assert [r["summary"]["onset_step"] for r in records] == [0, 0, 0]
    assert records[0]["train_loss"] is None and records[-1]["train_loss"] > 0
    assert records[-1]["summary"]["peak_sink_source"] == 0
    assert all(layer["sink_source"] is not None for layer in records[-1]["layers"])
