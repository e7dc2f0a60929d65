"""Optimisation for diffusion: Adam with cosine decay and an EMA of the weights.

The EMA weights are what the model samples with; at the end of training they are copied into the
module, so ``model.save`` stores them (a plan-only EMA would be lost on save).
"""

from __future__ import annotations

import torch
from scvi.train import TrainingPlan


class DiffusionTrainingPlan(TrainingPlan):
    """scvi-tools ``TrainingPlan`` with per-step cosine learning-rate decay and weight EMA.

    Parameters
    ----------
    module
        The diffusion module.
    ema_decay
        Decay of the exponential moving average of the weights (0 disables it). The effective
        decay warms up as ``min(ema_decay, (1 + k) / (10 + k))`` at step ``k`` so that short runs
        do not average in their random initialisation.
    cosine
        Decay the learning rate to zero with a per-step cosine schedule.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ``optimizer``, ...).
    """

    def __init__(self, module, *, ema_decay: float = 0.999, cosine: bool = True, **kwargs):
        kwargs.setdefault("lr", 1e-3)
        kwargs.setdefault("weight_decay", 0.0)
        kwargs.setdefault("eps", 1e-8)  # scvi's default eps=0.01 suits VAEs, not eps-prediction
        super().__init__(module, **kwargs)
        self.ema_decay = float(ema_decay)
        self.cosine = cosine
        self._ema: list[torch.Tensor] | None = None
        self._ema_steps = 0

    def get_optimizer_creator(self):  # noqa: D102
        if self.optimizer_name != "Adam":
            return super().get_optimizer_creator()
        # The fused kernel updates millions of head parameters ~5x faster than the default
        # for-each implementation on CPU (and is supported on CUDA).
        return lambda params: torch.optim.Adam(
            params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=True
        )

    def configure_optimizers(self):  # noqa: D102
        config = super().configure_optimizers()
        if self.cosine and "lr_scheduler" not in config:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(config["optimizer"], T_max=total)
            config["lr_scheduler"] = {"scheduler": sched, "interval": "step"}
        return config

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def on_train_start(self) -> None:  # noqa: D102
        super().on_train_start()
        if self.ema_decay > 0:
            self._ema = [p.detach().clone() for p in self._trainable()]
            self._ema_steps = 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._ema is None:
            return
        self._ema_steps += 1
        k = self._ema_steps
        decay = min(self.ema_decay, (1 + k) / (10 + k))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema, [p.detach() for p in self._trainable()], 1 - decay)

    def on_train_end(self) -> None:  # noqa: D102
        if self._ema is not None:
            with torch.no_grad():
                for p, e in zip(self._trainable(), self._ema, strict=True):
                    p.copy_(e)
            self._ema = None
