"""The scvi-tools model class, its training plan, its spaces and the scVI helper."""

from ._model import BranchedDiffusion
from ._persistence import UntrustedModelError, convert_legacy
from ._scvi import default_scvi_epochs, fit_scvi
from ._spaces import (
    SPACES,
    Decoded,
    ExpressionSpace,
    PcaSpace,
    ScviSpace,
    Space,
    TopologySource,
    register_space,
)
from ._training_plan import DiffusionTrainingPlan

__all__ = [
    "SPACES",
    "BranchedDiffusion",
    "Decoded",
    "DiffusionTrainingPlan",
    "ExpressionSpace",
    "PcaSpace",
    "ScviSpace",
    "Space",
    "TopologySource",
    "UntrustedModelError",
    "convert_legacy",
    "default_scvi_epochs",
    "fit_scvi",
    "register_space",
]
