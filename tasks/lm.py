"""Next-token language modelling around any router that maps tokens to logits."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from routers.routing import routing_of, scored_keys_of
from tasks.fused_loss import language_model_loss
from tasks.router_args import store_router_args


class LanguageModelTask(pl.LightningModule):
    """AdamW + linear warm-up + cosine decay; the router is a plain ``nn.Module``.

    ``config`` is the resolved run config and ``router`` the router's resolved constructor arguments
    (filled in at ``setup`` from the datamodule when not given: tasks.router_args); both are stored in every
    checkpoint so ``analyze.py`` can rebuild the router from a ``.ckpt`` alone. ``fused_loss`` computes the
    loss with the fused linear + cross-entropy head (tasks/fused_loss.py) where the router exposes its
    features; ``false`` materialises the logits as before (the same numbers up to float rounding).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100, min_lr_ratio: float = 0.1,
                 config: dict | None = None, router: dict | None = None, fused_loss: bool = True):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.nonfinite_step: int | None = None  # first step with a non-finite loss; callbacks/nonfinite.py stops the run on it

    def setup(self, stage: str) -> None:
        store_router_args(self)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def _loss(self, batch: Tensor) -> Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        return language_model_loss(self.model, inputs, targets, fused=self.hparams.get("fused_loss", True))

    def training_step(self, batch: Tensor, batch_idx: int):
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            # Returning None skips backward and the optimiser step, so the weights stay the last good ones.
            self.nonfinite_step = self.global_step
            self.trainer.should_stop = True
            return None
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def probe_routing(self, inputs: Tensor):
        """The routing record on probe inputs (the monitor handles eval mode), through the router's shortcut
        where it has one (routers/routing.py)."""
        return routing_of(self.model, inputs.to(self.device))

    @torch.no_grad()
    def probe_keys(self, inputs: Tensor) -> list[Tensor]:
        """Per-layer scored keys on probe inputs, all the shuffle null reads."""
        return scored_keys_of(self.model, inputs.to(self.device))

    def configure_optimizers(self):
        hp = self.hparams
        # Decay matrices only (nanoGPT): norms, biases and gains are not shrunk toward zero, nor parameters
        # a router marks `_no_weight_decay` (mamba_ssm's convention, e.g. the SSM's A_log).
        params = [p for p in self.parameters() if p.requires_grad]
        decayed = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
        kept = [p for p in params if not any(p is q for q in decayed)]
        groups = [{"params": decayed, "weight_decay": hp.weight_decay}, {"params": kept, "weight_decay": 0.0}]
        # foreach: one kernel per op over all tensors, 1.7x faster than the per-tensor loop torch picks on CPU,
        # with bit-identical updates (fused is 5x faster but rounds differently: docs/performance.md)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), foreach=True)
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps and self.trainer.max_steps > 0 else None

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if total is None:
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
