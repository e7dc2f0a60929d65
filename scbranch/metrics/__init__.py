"""Metrics of generated cells against real cells."""

from ._quality import centroid_spread, label_fidelity

__all__ = ["centroid_spread", "label_fidelity"]
