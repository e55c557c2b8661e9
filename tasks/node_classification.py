"""Full-batch node classification around any graph router ``model(x, edge_index) -> logits``."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from common.errors import UserError
from routers.routing import routing_of
from tasks.router_args import store_router_args

SPLITS = ("train", "val", "test")


def _check_graph(data) -> None:
    if not isinstance(data, Data):
        raise UserError(f"node classification needs a graph, got a {type(data).__name__} batch; use "
                        f"data=csbm (or cornell, texas, wisconsin, cora)")


class NodeClassificationTask(pl.LightningModule):
    """Adam on the training nodes' cross-entropy (docs/decisions.md: GAT and GCN: lr 5e-3, weight decay 5e-4); loss and accuracy
    of every split are logged at each validation.

    The usual number reported for these graphs is the test accuracy where validation accuracy peaked, so that
    is tracked too (``test/acc_at_best_val``; buffers, so a resumed run keeps its best). ``config`` is the
    resolved run config and ``router`` the router's resolved constructor arguments (in/out channels filled in
    at ``setup`` from the graph when not given: tasks.router_args); both are stored in every checkpoint.
    """

    def __init__(self, model: nn.Module, lr: float = 5e-3, weight_decay: float = 5e-4, config: dict | None = None,
                 router: dict | None = None):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.register_buffer("best_val_acc", torch.tensor(-1.0))
        self.register_buffer("best_val_loss", torch.tensor(float("inf")))
        self.register_buffer("test_acc_at_best_val", torch.tensor(float("nan")))
        self.nonfinite_step: int | None = None

    def setup(self, stage: str) -> None:
        store_router_args(self)

    def forward(self, data: Data) -> Tensor:
        _check_graph(data)
        return self.model(data.x, data.edge_index)

    @staticmethod
    def loss_and_accuracy(logits: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(logits[mask], y[mask])
        accuracy = (logits[mask].argmax(-1) == y[mask]).float().mean()
        return loss, accuracy

    def training_step(self, data: Data, batch_idx: int):
        loss, accuracy = self.loss_and_accuracy(self(data), data.y, data.train_mask)
        if not torch.isfinite(loss):
            # Returning None skips backward and the optimiser step, so the weights stay the last good ones.
            self.nonfinite_step = self.global_step
            self.trainer.should_stop = True
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/acc", accuracy, batch_size=1)
        return loss

    def validation_step(self, data: Data, batch_idx: int) -> None:
        logits = self(data)
        metrics = {}
        for split in SPLITS:
            loss, accuracy = self.loss_and_accuracy(logits, data.y, data[f"{split}_mask"])
            metrics[f"{split}/loss"], metrics[f"{split}/acc"] = loss, accuracy
        val_acc, val_loss = metrics["val/acc"], metrics["val/loss"]
        # Ties in accuracy (few validation nodes: 37 on Cornell) go to the lower validation loss.
        if val_acc > self.best_val_acc or (val_acc == self.best_val_acc and val_loss < self.best_val_loss):
            self.best_val_acc.fill_(val_acc)
            self.best_val_loss.fill_(val_loss)
            self.test_acc_at_best_val.fill_(metrics["test/acc"])
        metrics["val/best_acc"] = self.best_val_acc.clone()
        metrics["test/acc_at_best_val"] = self.test_acc_at_best_val.clone()
        self.log("val/acc", metrics.pop("val/acc"), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    @torch.no_grad()
    def probe_routing(self, data: Data):
        """The routing record on the probe graph (the monitor handles eval mode)."""
        _check_graph(data)
        return routing_of(self.model, data.to(self.device))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
