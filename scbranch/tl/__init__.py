"""Tools: scanpy-style functions that compute and store results in AnnData."""

from ._branch_hierarchy import branch_hierarchy, read_hierarchy

__all__ = ["branch_hierarchy", "read_hierarchy"]
