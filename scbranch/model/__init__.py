"""The scvi-tools model class, its training plan, and the scVI latent space helper."""

from ._model import BranchedDiffusion
from ._scvi import fit_scvi
from ._training_plan import DiffusionTrainingPlan

__all__ = ["BranchedDiffusion", "DiffusionTrainingPlan", "fit_scvi"]
