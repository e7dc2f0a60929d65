"""Plots: scanpy-style functions that draw what ``scbranch.tl`` stored in AnnData."""

from ._branch_tree import branch_similarity, branch_tree

__all__ = ["branch_similarity", "branch_tree"]
