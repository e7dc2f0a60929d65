"""Optimisation for diffusion in Lightning: the shared training recipe as an scvi-tools plan.

The EMA weights are what the model samples with; at the end of training they are copied into the
module, so ``model.save`` stores them (a plan-only EMA would be lost on save). The optimiser,
schedule and EMA come from :class:`~scbranch.module.TrainingRecipe`, which class extension uses
too.
"""

from __future__ import annotations

import torch
from scvi.train import TrainingPlan

from ..module._recipe import TrainingRecipe, WeightEMA


class DiffusionTrainingPlan(TrainingPlan):
    """scvi-tools ``TrainingPlan`` with per-step cosine learning-rate decay and weight EMA.

    Parameters
    ----------
    module
        The diffusion module.
    ema_decay
        Decay of the exponential moving average of the weights (0 disables it); warmed up as
        in :class:`~scbranch.module.WeightEMA`.
    cosine
        Decay the learning rate to zero with a per-step cosine schedule.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ``optimizer``, ...).

    Examples
    --------
    The model uses it for :meth:`~scbranch.BranchedDiffusion.train`; its options pass through:

    >>> model.train(plan_kwargs={"weight_decay": 1e-6})  # doctest: +SKIP
    """

    def __init__(self, module, *, ema_decay: float = 0.999, cosine: bool = True, **kwargs):
        defaults = TrainingRecipe()
        kwargs.setdefault("lr", defaults.lr)
        kwargs.setdefault("weight_decay", defaults.weight_decay)
        kwargs.setdefault("eps", defaults.eps)
        super().__init__(module, **kwargs)
        self.recipe = TrainingRecipe(
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            ema_decay=float(ema_decay),
            cosine=cosine,
        )
        self._ema: WeightEMA | None = None

    @property
    def ema_decay(self) -> float:
        """Decay of the weight EMA."""
        return self.recipe.ema_decay

    def get_optimizer_creator(self):  # noqa: D102
        if self.optimizer_name != "Adam":
            return super().get_optimizer_creator()
        return self.recipe.optimizer

    def configure_optimizers(self):  # noqa: D102
        config = super().configure_optimizers()
        if "lr_scheduler" not in config:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = self.recipe.scheduler(config["optimizer"], total)
            if sched is not None:
                config["lr_scheduler"] = {"scheduler": sched, "interval": "step"}
        return config

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def on_train_start(self) -> None:  # noqa: D102
        super().on_train_start()
        self._ema = self.recipe.ema(self._trainable())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._ema is not None:
            self._ema.update(self._trainable())

    def on_train_end(self) -> None:  # noqa: D102
        if self._ema is not None:
            self._ema.copy_to(self._trainable())
            self._ema = None
