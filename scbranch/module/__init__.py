"""Pure torch/numpy building blocks: forward process, tree, discovery, networks, samplers."""

from ._discovery import DiscoveryOptions, DiscoveryResult, discover_hierarchy, global_standardizer
from ._sde import VPSDE
from ._tree import Branch, BranchTree

__all__ = [
    "VPSDE",
    "Branch",
    "BranchTree",
    "DiscoveryOptions",
    "DiscoveryResult",
    "discover_hierarchy",
    "global_standardizer",
]

from ._module import BranchedDiffusionModule
from ._networks import ScoreNetwork
from ._recipe import TrainingRecipe, WeightEMA, draw_times
from ._sampling import SampleResult, sample, steps_for, time_grid
from ._solvers import DEFAULT_N_STEPS, DEFAULT_SOLVER, SOLVERS, Solver, get_solver, solver_names
from ._topology import (
    HierarchyError,
    Node,
    check_topology,
    from_linkage,
    from_nested,
    parse_newick,
)
from ._transport import TransportResult, denoise, transport

__all__ += [
    "BranchedDiffusionModule",
    "DEFAULT_N_STEPS",
    "DEFAULT_SOLVER",
    "HierarchyError",
    "Node",
    "SOLVERS",
    "SampleResult",
    "ScoreNetwork",
    "Solver",
    "TrainingRecipe",
    "TransportResult",
    "WeightEMA",
    "denoise",
    "check_topology",
    "draw_times",
    "from_linkage",
    "from_nested",
    "get_solver",
    "parse_newick",
    "sample",
    "steps_for",
    "solver_names",
    "time_grid",
    "transport",
]
