"""The reference the streamed seed-direction pass is held to: two routers' full routing records on the same
probe batches, accumulated pair by pair (the study itself streams keys-only passes; analysis/studies/seeds.py)."""
from analysis.studies.subspaces import KeyAccumulator, compare
from common.constants import RANK
from common.errors import UserError


class PairAccumulator:
    """Streams two routers' routing records on the same probe batches; :meth:`compute` gives one row per
    layer: VE@r of each, |dVE@r|, and the key- and token-space angles with their random-subspace nulls."""

    def __init__(self, rank: int = RANK):
        self.a, self.b = KeyAccumulator(rank), KeyAccumulator(rank)
        self.rank = rank

    def update(self, routing_a, routing_b) -> None:
        if len(routing_a.layers) != len(routing_b.layers):
            raise UserError(f"the two routers have {len(routing_a.layers)} and {len(routing_b.layers)} layers; "
                            "pair runs of the same architecture")
        (keys_a, names_a), (keys_b, names_b) = KeyAccumulator.of(routing_a), KeyAccumulator.of(routing_b)
        for ka, kb in zip(keys_a, keys_b):
            if ka.shape[0] != kb.shape[0] or ka.shape[2] != kb.shape[2]:
                raise UserError(f"the two models saw different probes ({tuple(ka.shape)} vs {tuple(kb.shape)}); "
                                "run both on the identical probe batch")
        self.a.update(keys_a, names_a)
        self.b.update(keys_b, names_b)

    def compute(self) -> list[dict]:
        return compare(self.a, self.b)
