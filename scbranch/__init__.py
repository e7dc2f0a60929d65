"""scbranch: hierarchically branched diffusion models that generate single cells."""

from importlib.metadata import PackageNotFoundError, version

from . import (
    _logging,  # noqa: F401  (configures the "scbranch" logger)
    baselines,
    datasets,
    io,
    metrics,
    model,
    module,
    pl,
    tl,
)
from .model import BranchedDiffusion

try:
    __version__ = version("scbranch")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "BranchedDiffusion",
    "baselines",
    "datasets",
    "io",
    "metrics",
    "model",
    "module",
    "pl",
    "tl",
    "__version__",
]
