"""Tools: scanpy-style functions that compute and store results in AnnData."""

from ._branch_hierarchy import branch_hierarchy, read_hierarchy
from ._evaluate import evaluate, read_evaluation
from ._generate import generate

__all__ = ["branch_hierarchy", "evaluate", "generate", "read_evaluation", "read_hierarchy"]
