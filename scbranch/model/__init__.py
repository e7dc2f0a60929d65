"""The scvi-tools model class and its training plan."""

from ._model import BranchedDiffusion
from ._training_plan import DiffusionTrainingPlan

__all__ = ["BranchedDiffusion", "DiffusionTrainingPlan"]
