"""Node-classification graphs, full batch: an embedded contextual SBM, WebKB, and Planetoid.

Every graph comes out the same way: undirected, coalesced, no self-loops (the routers add their own, one per
node), with one train/val/test split selected as boolean node masks. The training loader repeats the one graph
forever, so training length is ``trainer.max_steps`` like every other run here, one full-batch step each.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, stochastic_blockmodel_graph, to_undirected

from common.errors import UserError

WEBKB = ("cornell", "texas", "wisconsin")
PLANETOID = ("cora", "citeseer", "pubmed")
# The same cache as the text corpora (docs/data.md); conf/data/*.yaml spell it with ${oc.env:...}.
DEFAULT_ROOT = str(Path(os.environ.get("ROUTECOLLAPSE_DATA", Path.home() / ".cache" / "routecollapse")) / "graphs")


@dataclass
class GraphProbe:
    """The whole graph is the probe: one 'batch', no shuffle null (permuting which node owns which key only
    relabels the distance matrix, paper Section 5.1; the GCN control takes its place)."""
    data: Data

    def __len__(self) -> int:
        return 1

    def batches(self, batch_size: int) -> Iterator[tuple[Data, None]]:
        yield self.data, None

    def save(self, path: str | Path) -> None:
        torch.save({"kind": "graph", **{k: v for k, v in self.data.to_dict().items() if isinstance(v, Tensor)}},
                   path)

    @classmethod
    def load(cls, path: str | Path) -> "GraphProbe":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(Data(**{k: v for k, v in state.items() if k != "kind"}))
        except FileNotFoundError:
            raise UserError(f"no probe at {path}; pass probe=<file> or re-run training to create it") from None
        except Exception as e:
            raise UserError(f"probe file {path} is unreadable ({type(e).__name__}); delete it and rebuild") from None


class _Repeat(IterableDataset):
    def __init__(self, data: Data, times: int | None):
        self.data, self.times = data, times

    def __iter__(self):
        count = 0
        while self.times is None or count < self.times:
            yield self.data
            count += 1


class GraphDataModule(pl.LightningDataModule):
    """Full-batch node classification on one graph; subclasses implement ``load() -> Data`` with 1-D masks."""

    def __init__(self):
        super().__init__()
        self.data: Data | None = None
        self.probe: GraphProbe | None = None

    def load(self) -> Data:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = self.load()
        edge_index = remove_self_loops(data.edge_index)[0]
        data.edge_index = coalesce(to_undirected(edge_index, num_nodes=data.num_nodes), num_nodes=data.num_nodes)
        self.data = data
        self.probe = GraphProbe(data)

    def model_kwargs(self) -> dict:
        return {"in_channels": self.data.num_features, "out_channels": int(self.data.y.max()) + 1}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.data, None), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.data, 1), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def random_split(num_nodes: int, seed: int, fractions=(0.48, 0.32, 0.20)) -> tuple[Tensor, Tensor, Tensor]:
    """Train/val/test masks in Geom-GCN's 48/32/20 proportions (docs/decisions.md: GAT and GCN) from one permutation."""
    order = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = round(fractions[0] * num_nodes), round(fractions[1] * num_nodes)
    masks = []
    for part in (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]):
        mask = torch.zeros(num_nodes, dtype=torch.bool)
        mask[part] = True
        masks.append(mask)
    return tuple(masks)


class CSBMDataModule(GraphDataModule):
    """Contextual stochastic block model: the embedded default, no download.

    Graph: ``num_classes`` equal blocks; the two SBM edge probabilities are set so that the expected edge
    homophily is ``homophily`` and the expected degree ``avg_degree``. With within-class pairs W and
    between-class pairs B, the expected edge counts are p_in W = h E and p_out B = (1 - h) E for E = N deg / 2.
    1/num_classes is the homophily of a class-blind graph; below it the graph is heterophilic (WebKB: 0.1-0.2).
    Features: x = mu_y + N(0, I), with orthonormal class directions scaled so that any two class means are
    ``feature_snr`` noise standard deviations apart. Generated here rather than through PyG's
    ``StochasticBlockModelDataset``, whose scikit-learn features break with scikit-learn >= 1.7.
    ``graph_seed`` fixes graph and features; ``split`` draws one of the random 48/32/20 node splits.
    """

    def __init__(self, homophily: float = 0.1, num_nodes: int = 500, num_classes: int = 5, avg_degree: float = 4.0,
                 num_features: int = 64, feature_snr: float = 3.0, graph_seed: int = 0, split: int = 0):
        super().__init__()
        if not 0.0 <= homophily <= 1.0:
            raise UserError(f"homophily={homophily} is outside [0, 1]; set data.homophily to e.g. 0.1 "
                            f"(heterophilic) or 0.9 (homophilic)")
        if num_classes < 2 or num_nodes < 2 * num_classes or num_features < num_classes:
            raise UserError(f"CSBM needs num_classes >= 2, num_nodes >= 2*num_classes and num_features >= "
                            f"num_classes; got {num_classes}, {num_nodes}, {num_features}")
        self.homophily, self.num_nodes, self.num_classes = homophily, num_nodes, num_classes
        self.avg_degree, self.num_features, self.feature_snr = avg_degree, num_features, feature_snr
        self.graph_seed, self.split = graph_seed, split

    def edge_probabilities(self, block_sizes: list[int]) -> tuple[float, float]:
        n = self.num_nodes
        within = sum(b * (b - 1) / 2 for b in block_sizes)
        between = n * (n - 1) / 2 - within
        edges = n * self.avg_degree / 2
        p_in, p_out = self.homophily * edges / within, (1 - self.homophily) * edges / between
        if max(p_in, p_out) > 1:
            raise UserError(f"avg_degree={self.avg_degree} at homophily={self.homophily} needs an edge probability "
                            f"{max(p_in, p_out):.2f} > 1; lower data.avg_degree or raise data.num_nodes")
        return p_in, p_out

    def load(self) -> Data:
        c = self.num_classes
        block_sizes = [self.num_nodes // c + (i < self.num_nodes % c) for i in range(c)]
        p_in, p_out = self.edge_probabilities(block_sizes)
        probs = torch.full((c, c), p_out).fill_diagonal_(p_in)
        y = torch.repeat_interleave(torch.arange(c), torch.tensor(block_sizes))
        # PyG's generator draws from the global RNG: fork it so the graph depends on graph_seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.graph_seed)
            edge_index = stochastic_blockmodel_graph(block_sizes, probs)
        generator = torch.Generator().manual_seed(self.graph_seed)
        directions = torch.linalg.qr(torch.randn(self.num_features, c, generator=generator))[0].T
        # Orthonormal u_a, u_b are sqrt(2) apart, so scaling by snr / sqrt(2) puts the means snr apart.
        means = directions * (self.feature_snr / math.sqrt(2))
        x = means[y] + torch.randn(self.num_nodes, self.num_features, generator=generator)
        train, val, test = random_split(self.num_nodes, seed=1000 * self.graph_seed + self.split)
        return Data(x=x, edge_index=edge_index, y=y, train_mask=train, val_mask=val, test_mask=test)


def _load_pyg(make, raw_dir: Path, raw_files: list[str], download: bool, what: str, fix: str):
    """Build a PyG dataset, turning a missing, undownloadable or unreadable copy into one UserError."""
    missing = [f for f in raw_files if not (raw_dir / f).exists()]
    if missing and not download:
        raise UserError(f"{what} is not at {raw_dir} (missing {missing[0]}) and data.download=false; {fix}")
    try:
        return make()
    except Exception as e:  # download_url raises URLError, HTTPError or OSError offline, depending on the path
        if missing:
            raise UserError(f"{what} is not at {raw_dir} and downloading it failed ({type(e).__name__}); "
                            f"{fix}") from None
        raise UserError(f"{what} files at {raw_dir} are unreadable ({type(e).__name__}: {e}); delete "
                        f"{raw_dir.parent} and download again") from None


class WebKBDataModule(GraphDataModule):
    """WebKB Cornell / Texas / Wisconsin (Geom-GCN's heterophilic web-page graphs) with the 10 standard splits."""

    def __init__(self, name: str = "cornell", split: int = 0, root: str = DEFAULT_ROOT, download: bool = True):
        super().__init__()
        if name.lower() not in WEBKB:
            raise UserError(f"unknown WebKB graph {name!r}; choose one of {', '.join(WEBKB)}")
        if not 0 <= split <= 9:
            raise UserError(f"split={split} does not exist; WebKB has the 10 standard splits, data.split=0..9")
        self.name, self.split, self.root, self.download = name.lower(), split, Path(root), download

    def load(self) -> Data:
        from torch_geometric.datasets import WebKB

        raw_dir = self.root / self.name / "raw"
        raw_files = ["out1_node_feature_label.txt", "out1_graph_edges.txt"]
        raw_files += [f"{self.name}_split_0.6_0.2_{i}.npz" for i in range(10)]
        fix = (f"put {', '.join(raw_files[:2])} and {self.name}_split_0.6_0.2_{{0..9}}.npz from "
               f"github.com/graphdml-uiuc-jlu/geom-gcn (new_data/{self.name}/, splits/) there, or use data=csbm")
        dataset = _load_pyg(lambda: WebKB(str(self.root), self.name), raw_dir, raw_files, self.download,
                            f"WebKB {self.name}", fix)
        data = dataset[0]
        for mask in ("train_mask", "val_mask", "test_mask"):
            data[mask] = data[mask][:, self.split]
        return data


class PlanetoidDataModule(GraphDataModule):
    """Planetoid citation graphs (Cora by default): the homophilic contrast, with the public split."""

    def __init__(self, name: str = "cora", root: str = DEFAULT_ROOT, download: bool = True):
        super().__init__()
        if name.lower() not in PLANETOID:
            raise UserError(f"unknown Planetoid graph {name!r}; choose one of {', '.join(PLANETOID)}")
        self.name, self.root, self.download = name.lower(), Path(root), download

    def load(self) -> Data:
        from torch_geometric.datasets import Planetoid

        pyg_name = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}[self.name]
        raw_dir = self.root / pyg_name / "raw"
        raw_files = [f"ind.{self.name}.{part}" for part in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
        fix = f"put {' '.join(raw_files)} from github.com/kimiyoung/planetoid (data/) there, or use data=csbm"
        dataset = _load_pyg(lambda: Planetoid(str(self.root), pyg_name), raw_dir, raw_files, self.download,
                            f"Planetoid {pyg_name}", fix)
        return dataset[0]
