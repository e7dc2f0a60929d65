"""Pure torch/numpy building blocks: forward process, tree, discovery, networks, samplers."""

from ._discovery import DiscoveryResult, discover_hierarchy, global_standardizer
from ._sde import VPSDE
from ._tree import Branch, BranchTree

__all__ = [
    "VPSDE",
    "Branch",
    "BranchTree",
    "DiscoveryResult",
    "discover_hierarchy",
    "global_standardizer",
]

from ._module import BranchedDiffusionModule
from ._networks import ScoreNetwork
from ._sampling import SOLVERS, SampleResult, sample, time_grid
from ._transport import TransportResult, denoise, transport

__all__ += [
    "BranchedDiffusionModule",
    "ScoreNetwork",
    "sample",
    "time_grid",
    "SampleResult",
    "SOLVERS",
    "transport",
    "denoise",
    "TransportResult",
]
