"""A router family added by a test with no other edit: tests/toy_router.py declares it, its config is written
here into a Hydra search path, and it is then registered, trained under the collapse monitor, analysed and
benched like the families in routers/."""
import json

import torch

from routers.family import families
from tests.conftest import TINY, compose_train
from tests.toy_router import CONFIG, FAMILY, ToyRouter

# TINY's data, trainer and monitor; the router knobs are the toy's own
SMALL = [o for o in TINY if not o.startswith("router.")] + ["router.context_length=32"]


def search_path(tmp_path) -> str:
    """The toy's config, ``router/toy.yaml``, in a config folder Hydra searches besides conf/."""
    (tmp_path / "conf" / "router").mkdir(parents=True)
    (tmp_path / "conf" / "router" / "toy.yaml").write_text(CONFIG)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_the_toy_family_is_registered():
    assert FAMILY in families() and FAMILY.name == "toy" and FAMILY.statistics == ""


def test_the_toy_router_is_trained_under_the_monitor(tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    cfg = compose_train(tmp_path / "run", [search_path(tmp_path), "router=toy", "logger=csv", *SMALL])
    train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "collapse.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 10, 20]
    assert all(len(r["layers"]) == 1 and r["summary"]["family"] == "" for r in records)


def test_the_toy_router_is_analysed():
    from analysis.readers.model import measure
    from datamodules.probe import TokenProbe

    router = ToyRouter(37, context_length=32).eval()
    probe = TokenProbe.from_tokens(torch.randint(37, (8, 32), generator=torch.Generator().manual_seed(0)))
    sig = measure(router, probe, ranks=(1, 4), batch_size=4, name="toy")
    assert len(sig.layers) == 1 and sig.summary["family"] == ""
    assert 0 < sig.layers[0]["max_share"] <= 1


def test_the_toy_router_is_benched(tmp_path, monkeypatch):
    from bench.harness import build_family

    monkeypatch.setenv("ROUTECOLLAPSE_DATA", str(tmp_path / "cache"))
    built = build_family("toy", tmp_path / "bench", [search_path(tmp_path), *SMALL])
    assert isinstance(built.task.model, ToyRouter)
    assert torch.isfinite(torch.tensor([built.step(), built.step()])).all()


def test_the_toy_router_meets_the_router_protocols():
    from tests.test_router_protocols import test_every_family_router_meets_the_router_protocols as check

    check(FAMILY)
