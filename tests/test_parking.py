"""Per-head sinks in the record, the parking prediction and the solved step (docs/metrics.md), against
operators built by hand whose numbers follow in closed form."""
import math

import pytest
import torch

from analysis.reports.tables import parking, solved_step
from collapse import signature
from records import signature_parts, typed
from routers.routing import Routing, RoutingLayer, causal_mask

T, SEGMENT = 16, 7  # BOS, 7 segment tokens, 8 copies: queries 0..7 idle, 8..15 copy from t - 7
IDLE = (1 + SEGMENT) / T


def parking_head() -> torch.Tensor:
    """Idle queries on BOS, each copying query on the source one segment back (+1: the token to predict)."""
    w = torch.zeros(T, T)
    w[: SEGMENT + 1, 0] = 1.0
    for t in range(SEGMENT + 1, T):
        w[t, t - SEGMENT + 1] = 1.0
    return w


def uniform_head() -> torch.Tensor:
    return causal_mask(T).double().div(torch.arange(1, T + 1).view(T, 1)).float()


def record_of(heads: list[torch.Tensor], batch: int = 3) -> dict:
    weights = torch.stack(heads).unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
    keys = torch.randn(batch, len(heads), T, 8, generator=torch.Generator().manual_seed(0))
    layer = RoutingLayer(keys=keys, weights=weights, mask=causal_mask(T), name="L0")
    record = typed(signature_parts(signature(Routing(layers=[layer], axis="token"))))
    return typed({**record, "idle_fraction": IDLE, "step": 100})


def test_each_head_carries_its_own_sink_and_how_often_it_tops_the_operator():
    row = record_of([parking_head(), uniform_head(), parking_head()])["layers"][0]
    assert row["sink_source_units"] == [0, 0, 0]  # BOS tops a causal-uniform head too (H_n / n)
    assert row["sink_fraction_units"] == [1.0, 1.0, 1.0]
    # The parking head's BOS column holds its idle queries: (1 + SEGMENT) / T of the routing.
    assert row["max_share_units"][0] == pytest.approx(IDLE)
    assert row["max_share_units"][1] == pytest.approx(sum(1 / i for i in range(1, T + 1)) / T)


def test_the_parking_prediction_counts_parking_heads_times_the_idle_fraction_and_not_uniform_heads():
    record = record_of([parking_head(), uniform_head(), parking_head(), uniform_head()])
    out = parking(record, 0)
    assert out["parking_heads"] == 2 and out["units"] == 4
    assert out["parking_prediction"] == pytest.approx(2 / 4 * IDLE)
    measured = record["layers"][0]["max_share"]
    assert measured == pytest.approx((2 * IDLE + 2 * sum(1 / i for i in range(1, T + 1)) / T) / 4)
    assert out["parking_excess"] == pytest.approx(measured - 2 / 4 * IDLE)
    # A record without an idle fraction (text data) or without per-head sinks (older records) predicts nothing.
    assert math.isnan(parking(typed({**record, "idle_fraction": None}), 0)["parking_prediction"])
    del record["layers"][0]["sink_source_units"]
    assert math.isnan(parking(record, 0)["parking_heads"])


def test_solved_step_is_the_first_record_within_the_margin_of_the_solved_loss():
    records = [typed({"step": s, "val_loss": v, "solved_loss": 2.0})
               for s, v in [(0, None), (100, 3.0), (200, 2.11), (300, 2.09), (400, 2.5)]]
    assert solved_step(records) == 300.0          # 2.11 is 0.11 above: not yet
    assert solved_step(records, margin=0.2) == 200.0
    assert math.isnan(solved_step([typed({**r, "solved_loss": None}) for r in records]))  # no level: never


def test_a_studys_solved_margin_moves_its_learning_gated_reading():
    from analysis.studies.arms import gated
    from analysis.studies.spec import from_config

    record = record_of([parking_head(), uniform_head()])
    records = [typed({**record, "step": s, "val_loss": v, "solved_loss": 2.0}) for s, v in [(0, 5.0), (100, 2.2), (200, 2.15)]]
    assert math.isnan(gated(records, 0.2, 0.5)["solved_step"])  # the default 0.10 nats: never solved
    assert gated(records, 0.2, 0.5, solved_margin=0.25)["solved_step"] == 100.0
    spec = {"name": "s", "title": "S", "kind": "ordering", "factor": "router.position", "solved_margin": 0.25}
    assert from_config(spec).solved_margin == 0.25
