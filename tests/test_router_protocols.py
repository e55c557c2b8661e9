"""The router interface (routers/protocols.py) against every registered family (routers/family.py), graph
routers included: each family's tiny example router is an instance of the protocols and gives, through its
forward and through ``routing_of`` / ``scored_keys_of``, a routing record the signature reads."""
import pytest
import torch

from collapse import signature
from routers.family import Family, families, family, hf_adapters, register
from routers.protocols import (HFAdapter, Probe, ProbedModule, Router, RouterData, RoutingShortcut,
                               ScoredKeysShortcut, ShuffleNullModule)
from routers.routing import AXES, Routing, routing_of, scored_keys_of

FAMILIES = families()


def test_every_router_module_declares_its_family():
    assert {"pythia", "graph", "mamba", "rwkv", "attnres"} <= {f.name for f in FAMILIES}
    assert all(f.axis in AXES and f.example is not None for f in FAMILIES)
    assert {"gpt_neox", "mamba", "rwkv"} <= set(hf_adapters())


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_every_family_router_meets_the_router_protocols(fam):
    router, inputs = fam.example()
    assert isinstance(router, Router)
    with torch.no_grad():
        out, routing = router(inputs, return_routing=True)
        assert torch.allclose(router(inputs), out)  # the record does not change the output
        via, keys = routing_of(router, inputs), scored_keys_of(router, inputs)
    assert isinstance(routing, Routing) and routing.axis == fam.axis and len(routing) >= 1
    assert routing.statistics == fam.statistics and routing.family == (fam.name if fam.statistics else "")
    for layer, other, key in zip(routing, via, keys, strict=True):
        assert layer.statistics == fam.statistics
        batch, units, sources, _ = layer.scored_keys.shape  # [batch, units, sources, d]
        if layer.is_sparse:  # [2, E] edges, [E, units] weights over num_nodes sources
            assert layer.edge_index.shape[0] == 2 and layer.edge_weight.shape == (layer.edge_index.shape[1], units)
            assert layer.num_nodes == sources
        else:
            # [batch, units chunk, queries, sources]; the keys' units may differ (Mamba's B is shared by all
            # channels, a depth router's keys are per token)
            assert all(c.dim() == 4 and c.shape[0] == batch and c.shape[-1] == sources for c in layer.iter_weights())
        assert torch.allclose(other.scored_keys, layer.scored_keys, atol=1e-6)
        assert torch.allclose(key, layer.scored_keys, atol=1e-6)
    if isinstance(router, RoutingShortcut):  # the shortcut is the forward's record
        assert len(router.routing(inputs)) == len(routing)
    if isinstance(router, ScoredKeysShortcut):
        assert len(router.scored_keys(inputs)) == len(routing)
    assert len(signature(routing, ranks=(1, 2)).layers) == len(routing)  # the metrics read it as it is


@pytest.mark.parametrize("model_type", sorted(hf_adapters()))
def test_hf_adapting_families_build_from_hf(model_type):
    assert isinstance(type(hf_adapters()[model_type].example()[0]), HFAdapter)


def test_the_task_and_data_side_meet_their_protocols():
    from datamodules.generated import GeneratedDataModule
    from datamodules.graph import GraphDataModule, GraphProbe
    from datamodules.lm import LMDataModule
    from datamodules.probe import TokenProbe
    from tasks.lm import LanguageModelTask
    from tasks.node_classification import NodeClassificationTask

    assert issubclass(LanguageModelTask, ShuffleNullModule) and issubclass(NodeClassificationTask, ProbedModule)
    assert issubclass(TokenProbe, Probe) and issubclass(GraphProbe, Probe)
    assert all(issubclass(cls, RouterData) for cls in (LMDataModule, GeneratedDataModule, GraphDataModule))


def test_node_classification_probes_graph_routers_through_routing_of():
    from tasks.node_classification import NodeClassificationTask

    router, graph = family("graph").example()
    task = NodeClassificationTask(router).eval()
    routing, direct = task.probe_routing(graph), router(graph.x, graph.edge_index, return_routing=True)[1]
    assert [layer.edge_weight.tolist() for layer in routing] == [layer.edge_weight.tolist() for layer in direct]


def test_families_are_declared_once():
    graph = family("graph")
    assert register(graph) is graph  # a module imported again re-declares the same family
    with pytest.raises(Exception, match="declared twice"):
        register(Family("graph", axis="token"))
    with pytest.raises(Exception, match="unknown router family 'nope'"):
        family("nope")
