"""Plots: scanpy-style functions that draw what ``scbranch.tl`` stored in AnnData."""

from ._branch_tree import branch_similarity, branch_tree
from ._compare import compare_hierarchies
from ._evaluation import evaluation
from ._trajectories import trajectories, transmutation_genes

__all__ = [
    "branch_similarity",
    "branch_tree",
    "compare_hierarchies",
    "evaluation",
    "trajectories",
    "transmutation_genes",
]
