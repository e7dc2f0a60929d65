"""Optimisation for diffusion in Lightning: the shared training recipe as an scvi-tools plan.

The EMA weights are what the model samples with; at the end of training they are copied into the
module, so ``model.save`` stores them (a plan-only EMA would be lost on save). The optimiser,
schedule and EMA come from :class:`~scbranch.module.TrainingRecipe`, which class extension uses
too.

Validation (``train(train_size < 1, check_val_every_n_epoch=k)`` or ``early_stopping=True``)
scores the EMA weights, the ones the model will sample with, on the held-out cells at fixed
noise levels and fixed draws (``get_denoising_error``'s quantity): the curve in
``model.history["validation_loss"]`` then moves only when the model does, where scvi-tools'
default (the live weights at random times and noise, drawn from the training's own random
stream) adds the loss's sampling noise and changes the training draws.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import shutil
import tempfile

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.train import TrainingPlan

from .._validation import check_whole_number
from ..module._recipe import TrainingRecipe, WeightEMA, default_max_epochs
from ._diagnostics import DEFAULT_TIMES, noise_errors

#: environment variable naming the DDP processes' shared history directory
_DDP_LOG_DIR = "SCBRANCH_DDP_LOG_DIR"

#: seed of the validation noise: every validation epoch scores the same draws
VALIDATION_SEED = 0
logger = logging.getLogger(__name__)


def split_sizes(train_size: float, validation_size: float | None) -> tuple[float, float | None]:
    """``train``'s ``train_size`` and ``validation_size``, the first following the second.

    ``train(validation_size=0.1)`` alone means "hold out 10 %, train on the rest": the default
    ``train_size=1.0`` would leave no room for it (scvi-tools refuses sizes adding up past 1).
    """
    if validation_size is None:
        return train_size, None
    if not 0.0 < validation_size < 1.0:
        raise ValueError(
            f"validation_size must lie between 0 and 1 (a fraction of the cells), got "
            f"{validation_size!r}."
        )
    if train_size == 1.0:
        train_size = 1.0 - validation_size
    return train_size, validation_size


def check_budget(max_epochs: int, trainer_kwargs: dict) -> None:
    """Refuse a training budget of no steps.

    It would leave the random weights marked as trained (scvi-tools sets ``is_trained`` once
    Lightning returns), and every later ``generate`` would sample noise without a warning.
    """
    why = "training no steps leaves the network's random weights (leave max_epochs out for "
    why += "the default budget)."
    check_whole_number("max_epochs", max_epochs, 1, why)
    max_steps = trainer_kwargs.get("max_steps")
    if max_steps is not None and max_steps != -1:  # Lightning's -1: no limit
        check_whole_number("max_steps", max_steps, 1, why)


@contextlib.contextmanager
def keep_new_history(model):
    """Around a further ``train()``: keep the keys its history adds.

    scvi-tools merges the history of a model trained before only into the keys the first
    training logged, so ``validation_loss`` of a second ``train(train_size=0.9, ...)`` after a
    first one without validation was dropped. Its rows are numbered on after the epochs before.
    """
    history = model.history_
    before = dict(history) if model.is_trained_ and isinstance(history, dict) else None
    yield
    logged = getattr(getattr(getattr(model, "trainer", None), "logger", None), "history", None)
    if not before or not logged or not isinstance(model.history_, dict):
        return
    offset = max((len(frame) for frame in before.values()), default=0)
    for key, frame in logged.items():
        if key not in before:
            frame = frame.copy()
            frame.index = np.arange(offset, offset + len(frame))
            model.history_[key] = frame


def _shared_ddp_log_dir(trainer_kwargs: dict) -> None:
    """Keep scvi-tools' DDP history file out of the user's working directory.

    Under DDP scvi-tools' logger writes the history into ``./lightning_logs`` of the current
    directory for the other processes to read; the processes share one temporary directory
    instead (Lightning's launcher passes the environment on to the processes it starts).
    """
    if (
        "ddp" not in str(trainer_kwargs.get("strategy", "")).lower()  # a name or DDPStrategy()
        or trainer_kwargs.get("logger") is not None
        or "log_save_dir" in trainer_kwargs
    ):
        return
    if _DDP_LOG_DIR not in os.environ:
        os.environ[_DDP_LOG_DIR] = tempfile.mkdtemp(prefix="scbranch-ddp-")
        # the process that made it (rank 0, which the others' launcher started from) removes
        # it when the script ends: the histories in it are read during training only
        atexit.register(shutil.rmtree, os.environ[_DDP_LOG_DIR], ignore_errors=True)
    trainer_kwargs["log_save_dir"] = os.environ[_DDP_LOG_DIR]


def trainer_defaults(
    trainer_kwargs: dict,
    max_epochs: int | None,
    n_cells: int,
    batch_size: int,
    train_size: float,
    validation_size: float | None,
) -> tuple[int, dict]:
    """Fill in the Lightning trainer's options that ``model.train`` defaults (in place).

    Returns the number of epochs (the default budget for `None`, else ``max_epochs``
    checked) and the plan's options that follow from the trainer's (``restore_best`` with
    early stopping).
    """
    steps_per_epoch = max(1, math.ceil(n_cells * train_size / batch_size))
    if max_epochs is None:
        max_epochs = default_max_epochs(round(n_cells * train_size), batch_size)
    check_budget(max_epochs, trainer_kwargs)
    # log at least once an epoch (Lightning warns when an epoch is shorter than its interval)
    trainer_kwargs.setdefault("log_every_n_steps", min(50, steps_per_epoch))
    trainer_kwargs.setdefault("gradient_clip_val", TrainingRecipe.grad_clip)
    _shared_ddp_log_dir(trainer_kwargs)
    held_out = (1.0 - train_size) if validation_size is None else validation_size
    asks = [k for k in ("check_val_every_n_epoch", "enable_checkpointing") if trainer_kwargs.get(k)]
    asks += [
        type(c).__name__
        for c in trainer_kwargs.get("callbacks") or []
        if getattr(c, "monitor", None) == "validation_loss"
    ]
    if held_out <= 0 and asks and not trainer_kwargs.get("early_stopping"):
        raise ValueError(
            f"{', '.join(asks)} validates on held-out cells, and train_size={train_size:g} holds "
            "none out: pass train_size < 1 (e.g. 0.9) or validation_size, or drop "
            f"{asks[0]}."
        )
    for callback in trainer_kwargs.get("callbacks") or []:
        if getattr(callback, "load_best_on_end", False):
            # scvi-tools reloads the best checkpoint as its pickled model.pt, which scbranch
            # does not write: training would fail once finished
            raise ValueError(
                "SaveCheckpoint(load_best_on_end=True) cannot reload scbranch's checkpoints; "
                "use early_stopping=True (it keeps the weights of the lowest validation_loss), "
                "or load the best one yourself: BranchedDiffusion.load(callback.best_model_path)."
            )
    if trainer_kwargs.get("early_stopping"):
        if held_out <= 0:
            raise ValueError(
                "early_stopping watches the error on held-out cells, and train_size="
                f"{train_size:g} holds none out: pass train_size < 1 (e.g. 0.9), or leave "
                "early_stopping off (the default budget was chosen on held-out cells, "
                "docs/benchmarks/denoising_gap.md)."
            )
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
    return max_epochs, {"restore_best": bool(trainer_kwargs.get("early_stopping"))}


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
    restore_best
        End with the weights (the EMA) of the validation check with the lowest
        ``validation_loss`` instead of the last ones (``model.train`` sets it with
        ``early_stopping``, which otherwise ends a patience past the best).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ``optimizer``, ...).

    Examples
    --------
    The model uses it for :meth:`~scbranch.BranchedDiffusion.train`; its options pass through:

    >>> model.train(plan_kwargs={"weight_decay": 1e-6})  # doctest: +SKIP
    """

    def __init__(
        self,
        module,
        *,
        ema_decay: float = 0.999,
        cosine: bool = True,
        restore_best: bool = False,
        **kwargs,
    ):
        defaults = TrainingRecipe()
        kwargs.setdefault("lr", defaults.lr)
        kwargs.setdefault("weight_decay", defaults.weight_decay)
        kwargs.setdefault("eps", defaults.eps)
        # scvi-tools' plateau scheduler watches elbo_validation, which this plan never logs
        kwargs.setdefault("lr_scheduler_metric", "validation_loss")
        super().__init__(module, **kwargs)
        self.recipe = TrainingRecipe(
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            ema_decay=float(ema_decay),
            cosine=cosine,
        )
        self._ema: WeightEMA | None = None
        self._ema_in_module = False  # swapped in while validation scores it
        self.restore_best = bool(restore_best)
        self._best: tuple[float, int, list[torch.Tensor]] | None = None  # loss, epoch, weights

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

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights by parameter name while they are not in the module, else `None`.

        What a model saved mid-training (a checkpoint) must hold: the weights it samples with
        after training and that ``validation_loss`` scores, not the live ones.
        """
        if self._ema is None or self._ema_in_module:
            return None
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        return dict(zip(names, self._ema.shadow, strict=True))

    def on_fit_start(self) -> None:  # noqa: D102
        # scvi-tools leaves the module in eval mode after training, and Lightning keeps the
        # mode it finds; a second ``train`` call must train in training mode (GPU head batching)
        self.module.train()
        if getattr(self.module, "tree", None) is not None:
            # every head now learns every class on its branch, types added by add_classes
            # included (the clean-cell estimates' Gaussians follow: module/_denoiser.py)
            self.module.tree.mark_trained()
        super().on_fit_start()

    def on_train_start(self) -> None:  # noqa: D102
        super().on_train_start()
        self._ema = self.recipe.ema(self._trainable())

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._ema is not None:
            self._ema.update(self._trainable())

    def compute_and_log_metrics(self, loss_output, metrics, mode) -> None:
        """Log nothing beyond ``train_loss``: scvi-tools' ELBO and KL terms are a VAE's."""

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        super().on_validation_epoch_start()
        self._validation_draws = torch.Generator().manual_seed(VALIDATION_SEED)
        self._validation_sum = [0.0, 0]  # error summed over cells (a tensor once added), cells
        if self._ema is not None:
            self._ema.swap(self._trainable())
            self._ema_in_module = True

    def validation_step(self, batch, batch_idx) -> None:
        """Denoising error of the EMA weights on held-out cells at fixed times and draws."""
        module = self.module
        z = module.standardize(batch[module.data_key].to(module.shift.dtype))
        labels = batch[REGISTRY_KEYS.LABELS_KEY].long().view(-1)
        errors = []
        for t in DEFAULT_TIMES:  # noise drawn on the CPU: the same draws on any device
            noise = torch.randn(
                z.shape, generator=self._validation_draws, dtype=z.dtype, device="cpu"
            )
            errors += noise_errors(module, z, labels, t, noise.to(z.device), gaussian=False)
        loss = torch.stack(errors).mean()
        self._validation_sum[0] += loss.detach() * len(z)  # no host sync per batch
        self._validation_sum[1] += len(z)
        self.log(
            "validation_loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=len(z),
            sync_dist=self.use_sync_dist,
        )

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        total, n = float(self._validation_sum[0]), self._validation_sum[1]
        if self.restore_best and n and (self._best is None or total / n < self._best[0]):
            # the weights just scored (the EMA, swapped in) are the best so far
            weights = [p.detach().clone() for p in self._trainable()]
            self._best = (total / n, self.current_epoch, weights)
        if self._ema is not None:
            self._ema.swap(self._trainable())
            self._ema_in_module = False
        super().on_validation_epoch_end()

    def on_train_end(self) -> None:  # noqa: D102
        if self._best is not None:
            loss, epoch, weights = self._best
            with torch.no_grad():
                for p, best in zip(self._trainable(), weights, strict=True):
                    p.copy_(best)
            logger.info(
                "Kept the weights of epoch %d, the lowest validation loss (%.4f).", epoch + 1, loss
            )
            self._ema = self._best = None
        if self._ema is not None:
            self._ema.copy_to(self._trainable())
            self._ema = None
