"""Datasets shipped with installed packages or simulated in code (never downloaded)."""

from ._atlas import simulate_atlas
from ._atlas_parameters import AtlasParameters, fit_atlas_parameters
from ._pbmc import pbmc68k
from ._simulate import SimulatedTree, simulate_tree
from ._split import stratified_split

__all__ = [
    "pbmc68k",
    "simulate_tree",
    "SimulatedTree",
    "simulate_atlas",
    "fit_atlas_parameters",
    "AtlasParameters",
    "stratified_split",
]
