"""End to end on CPU: a real 2 x 2 tiny sweep (NoPE / ALiBi x two weight seeds) trained in-process, then
``analyze.py`` on one run, on the sweep, and both studies, checking the files, their columns and their values."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import analyze
from analysis.studies.subspaces import random_subspace_angle
from tests.conftest import TINY, compose_train

STEPS = ["trainer.max_steps=6", "callbacks.collapse_monitor.every_n_steps=3", "callbacks.checkpoint.every_n_train_steps=6",
         "trainer.val_check_interval=3", "logger=csv"]
ARMS = [("nope", 0), ("nope", 1), ("alibi", 0), ("alibi", 1)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A multirun-shaped folder: job ``<i>_router/position=<p>,seed=<s>`` (Hydra nests group overrides)."""
    import train

    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as env:  # module-scoped, so no monkeypatch fixture
        env.setenv("ROUTECOLLAPSE_DATA", str(root / "cache"))
        for i, (position, seed) in enumerate(ARMS):
            out = root / "multirun" / f"{i}_router" / f"position={position},seed={seed}"
            train.train(compose_train(out, TINY + STEPS + [f"router/position={position}", f"seed={seed}"]))
    return root / "multirun"


def rows(path):
    return list(csv.DictReader(open(path)))


def run(*args):
    assert analyze.main(list(args)) == 0


def test_run_analysis_recomputes_exactly_what_the_monitor_logged(sweep, tmp_path):
    job = sweep / "0_router" / "position=nope,seed=0"
    run(f"run={job}", f"out={tmp_path}", "batch_size=3", "--wandb")
    logged = [json.loads(line) for line in (job / "collapse.jsonl").read_text().splitlines()][-1]
    again = json.loads((tmp_path / "signature.json").read_text())
    assert again["step"] == logged["step"] == 6
    for ours, theirs in zip(again["layers"], logged["layers"]):  # same weights, same probe: same numbers
        for key in ("max_share", "norm_cv", "ve@8", "ve@8_shuffle", "ve@1"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    table = rows(tmp_path / "signature.csv")
    assert len(table) == 2 and {"norm_cv", "ve@8", "ve@8_gauss", "ve@8_shuffle", "content@8", "marginal@8",
                                "max_share", "ve@4", "ve@1"} <= set(table[0])
    heads = rows(tmp_path / "heads.csv")
    assert len(heads) == 2 * 2 and all(0 < float(h["max_share"]) <= 1 for h in heads)  # 2 layers x 2 heads
    assert "| onset |" in (tmp_path / "summary.md").read_text() and (tmp_path / "signature.png").stat().st_size
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # --wandb: one offline W&B run with the tables


def test_sweep_table_has_one_row_per_run_with_its_axes(sweep):
    run(f"sweep={sweep}")
    table = rows(sweep / "analysis" / "sweep.csv")
    assert [(r["router.position"], int(r["seed"])) for r in table] == ARMS
    assert all(0 < float(r["peak"]) <= 1 and r["onset"] in ("never",) + tuple(f"L{i}" for i in range(2))
               or r["onset"].startswith("L") for r in table)
    assert (sweep / "analysis" / "collapse_over_training.png").stat().st_size


def test_brake_ordering_study_writes_arms_checks_verdict_and_figures(sweep):
    run(f"sweep={sweep}", "study=brake_ordering")
    out = sweep / "analysis" / "brake_ordering"
    arms = rows(out / "arms.csv")
    assert [a["arm"] for a in arms] == ["nope", "alibi"] and all(a["runs"] == "2" for a in arms)
    for a in arms:
        assert 0 < float(a["peak_max_share"]) <= 1
        low, high = float(a["peak_max_share_low"]), float(a["peak_max_share_high"])
        assert low <= float(a["peak_max_share"]) <= high
    per_run = rows(out / "runs.csv")
    assert len(per_run) == 4 and {"onset_depth", "onset_step", "peak_gain", "area_above_baseline", "val_loss"} <= set(per_run[0])
    checks = rows(out / "checks.csv")
    gated = ["onset_depth_censored", "peak_max_share", "area_above_baseline"]
    assert [c["key"] for c in checks] == [f"{k}@solved" for k in gated] + [f"{k}@solved+k" for k in gated] + [
        "onset_depth_censored", "onset_step_censored", "peak_max_share", "peak_gain", "area_above_baseline",
        "onset_loss_censored"]
    assert all(0 <= float(c["p_predicted"]) <= 1 for c in checks if c["at"] == "step")
    assert "**Verdict:" in (out / "verdict.md").read_text()
    assert (out / "profiles.png").stat().st_size and (out / "trajectories.png").stat().st_size


def test_a_brake_study_at_rank_4_reads_ve_at_4_from_real_records(sweep, tmp_path):
    run(f"sweep={sweep}", "study=brake_ordering", "rank=4", f"out={tmp_path}")
    arms = rows(tmp_path / "arms.csv")
    assert all(0 < float(a["ve@4"]) <= 1 and 0 < float(a["ve@4_gauss"]) <= 1 for a in arms)
    assert "ve@8" not in arms[0] and "ve@4" in (tmp_path / "verdict.md").read_text()
    assert (tmp_path / "profiles.png").stat().st_size and (tmp_path / "trajectories.png").stat().st_size


def test_seed_direction_study_pairs_the_weight_seeds_and_reports_angles_against_their_nulls(sweep):
    run(f"sweep={sweep}", "study=seed_direction", "rank=4")
    out = sweep / "analysis" / "seed_direction"
    summary = rows(out / "summary.csv")
    assert [(s["reseed"], s["pairs"]) for s in summary] == [("weight", "2")]  # one NoPE pair, one ALiBi pair
    layers = rows(out / "layers.csv")
    assert len(layers) == 2 * 2
    for row in layers:
        assert 0 <= float(row["delta_ve@4"]) < 0.5
        for key in ("token_angle", "key_angle", "token_angle_untrained", "key_angle_untrained"):
            assert 0 <= float(row[key]) <= 90, key
        assert float(row["token_angle_null"]) == pytest.approx(random_subspace_angle(31, 4))  # T = 32 tokens
        assert float(row["key_angle_null"]) == pytest.approx(random_subspace_angle(32, 4))  # 2 heads x 16 dims
    assert (out / "seed_direction.png").stat().st_size
    assert "direction no verdict, too few pairs (2; need >= 3)" in (out / "summary.md").read_text()


def test_each_run_and_the_untrained_pair_are_measured_once_per_probe(sweep, monkeypatch):
    from analysis.studies import seeds
    from analysis.readers.runs import find_runs

    calls = []
    real = seeds.measure_keys
    monkeypatch.setattr(seeds, "measure_keys", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    a, b = [r for r in find_runs(sweep) if r.get("router.position") == "nope"]
    untrained, keys = {}, {}
    first = seeds.compare_pair(a, b, rank=4, untrained_cache=untrained, keys_cache=keys)
    again = seeds.compare_pair(b, a, rank=4, untrained_cache=untrained, keys_cache=keys)  # nothing measured again
    assert len(calls) == 8 and [c.startswith("untrained") for c in calls] == [False, False] + [True] * 6  # 3 pairs
    assert [r["token_angle_untrained"] for r in again] == [r["token_angle_untrained"] for r in first]
    assert [r["token_angle"] for r in again] == pytest.approx([r["token_angle"] for r in first], abs=1e-6)


def test_keys_measured_once_per_run_give_the_rows_of_streaming_the_pair_together(sweep):
    """The per-run path (keys_cache, forward passes of FORWARD_BATCH, the vocabulary head skipped) against the
    reference: both full forwards streamed through one PairAccumulator, batch by batch (batch 6 of an 8-sequence
    probe: batches 6 + 2, forward passes 4 + 2 + 2)."""
    from analysis.studies import seeds
    from analysis.readers.runs import find_runs, load_router
    from pair_reference import PairAccumulator
    from datamodules.probe import TokenProbe

    a, b = [r for r in find_runs(sweep) if r.get("router.position") == "alibi"]
    rows = seeds.compare_pair(a, b, rank=4, batch_size=6, keys_cache={})
    probe = TokenProbe.load(a.path / "probe.pt")
    router_a, router_b = load_router(a.path)[0], load_router(b.path)[0]
    reference = PairAccumulator(4)
    with torch.no_grad():
        for tokens, _ in probe.batches(6):
            reference.update(router_a(tokens, return_routing=True)[1], router_b(tokens, return_routing=True)[1])
    expected = reference.compute()
    assert len(rows) == len(expected) == 2
    for row, ref in zip(rows, expected):
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of run=, model=, sweep="),
    (["run=/no/such/run"], "no checkpoint at /no/such/run"),
    (["sweep=/no/such/sweep"], "does not exist"),
    (["model=gpt2"], "hf:"),
    (["colour=blue"], "conf/analyze.yaml"),
])
def test_bad_arguments_exit_2_with_one_line_naming_the_fix(args, message, capsys):
    assert analyze.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_help_lists_every_key_of_the_analysis_config_with_its_comment(capsys):
    assert analyze.main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in (Path(analyze.CONF) / "analyze.yaml").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            assert line in out  # e.g. "tokenizer: null       # a Hub name or folder ..."


def test_a_corpus_probe_for_a_run_without_tokenizer_fails_with_one_line(sweep, capsys):
    assert analyze.main([f"run={sweep / '0_router' / 'position=nope,seed=0'}", "probe=wikitext103"]) == 2
    assert "no text tokenizer" in capsys.readouterr().err  # trained on the synthetic language


def test_unknown_study_is_refused_before_any_work(sweep, capsys):
    assert analyze.main([f"sweep={sweep}", "study=brakes"]) == 2
    assert "choose one of alibi_slope, attnres_offset, brake_ordering, csbm_homophily, idle_fraction, mamba_freeze, metric_study, normalization_study, rwkv_decay_sweep, seed_direction" in capsys.readouterr().err


@pytest.fixture
def tiny_pythia(tmp_path):
    """A random tiny GPT-NeoX saved to ``tmp_path/pythia`` and a 6 x 32 probe file beside it."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from datamodules.probe import TokenProbe

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, bos_token_id=0,
                                     eos_token_id=0)).save_pretrained(tmp_path / "pythia")
    TokenProbe.from_tokens(torch.randint(0, 64, (6, 32))).save(tmp_path / "probe.pt")
    return tmp_path / "pythia", tmp_path / "probe.pt"


def test_hf_checkpoint_analysis_reports_pythia_keys_pre_and_post_rotary(tiny_pythia, tmp_path):
    folder, probe = tiny_pythia
    run(f"model=hf:{folder}", f"probe={probe}", f"out={tmp_path / 'out'}")
    model = rows(tmp_path / "out" / "models.csv")[0]
    assert model["L"] == "2" and model["d_h"] == "32"
    assert not math.isnan(float(model["VE@8 post"])) and float(model["VE@8 post"]) != float(model["VE@8"])
    assert (tmp_path / "out" / "final" / "signature.png").stat().st_size


def test_pythia_revisions_draw_the_real_trajectory_beside_ours(tiny_pythia, sweep, tmp_path, monkeypatch):
    import analysis.readers.hf

    folder, probe = tiny_pythia
    load, asked = analysis.readers.hf.load_hf, []

    def hub(spec):  # offline stand-in for the Hub: every revision resolves to the tiny local model
        asked.append(spec)
        return load(f"hf:{folder}")[0], spec[3:]

    monkeypatch.setattr(analysis.readers.hf, "load_hf", hub)
    run("model=hf:EleutherAI/pythia-160m", "revisions=[step0,step1000]", f"compare={sweep / '0_router' / 'position=nope,seed=0'}",
        f"probe={probe}", f"out={tmp_path / 'curve'}")
    assert asked == ["hf:EleutherAI/pythia-160m@step0", "hf:EleutherAI/pythia-160m@step1000"]
    assert [r["model"] for r in rows(tmp_path / "curve" / "models.csv")] == ["EleutherAI/pythia-160m@step0",
                                                                             "EleutherAI/pythia-160m@step1000"]
    assert json.loads((tmp_path / "curve" / "step1000" / "signature.json").read_text())["step"] == 1000
    assert (tmp_path / "curve" / "collapse_over_training.png").stat().st_size


def test_threads_sets_torchs_cpu_threads_before_the_work(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert analyze.main([f"sweep={tmp_path / 'missing'}", "threads=1"]) == 2  # fails after the setting
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
