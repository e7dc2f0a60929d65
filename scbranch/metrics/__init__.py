"""Metrics of generated cells against real cells."""

from ._quality import centroid_spread, label_fidelity, quality_report

__all__ = ["centroid_spread", "label_fidelity", "quality_report"]
