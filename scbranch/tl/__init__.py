"""Tools: scanpy-style functions that compute and store results in AnnData."""

from ._branch_hierarchy import branch_hierarchy, read_hierarchy
from ._branch_stability import branch_stability, read_stability
from ._compare import compare_hierarchies
from ._embed import embed_like
from ._evaluate import evaluate, read_evaluation
from ._generate import generate, generate_anchored, hybrids, transmute
from ._interpret import (
    identity_retention,
    rank_transmutation_genes,
    read_interpretation,
    transmutation_success,
)
from ._out_of_fold import pca_out_of_fold

__all__ = [
    "branch_hierarchy",
    "branch_stability",
    "compare_hierarchies",
    "embed_like",
    "evaluate",
    "generate",
    "generate_anchored",
    "hybrids",
    "identity_retention",
    "pca_out_of_fold",
    "rank_transmutation_genes",
    "read_interpretation",
    "read_evaluation",
    "read_hierarchy",
    "read_stability",
    "transmutation_success",
    "transmute",
]
