"""Tools: scanpy-style functions that compute and store results in AnnData."""

from ._branch_hierarchy import branch_hierarchy, read_hierarchy
from ._generate import generate

__all__ = ["branch_hierarchy", "generate", "read_hierarchy"]
