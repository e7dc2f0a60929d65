"""Metrics of generated cells against real cells (the building blocks of ``tl.evaluate``)."""

from ._classifier import classifier_auroc
from ._de import lfc_spearman, log_fold_changes, marker_overlap, top_markers
from ._distances import MMD_BANDWIDTHS, median_bandwidth, mmd_rbf, wasserstein2
from ._genes import gene_mean_ceiling, gene_moment_spearman, zero_fraction, zero_fraction_error
from ._quality import centroid_spread, label_fidelity, quality_report
from ._reference import ReferencePCA, split_for_fitting

__all__ = [
    "MMD_BANDWIDTHS",
    "ReferencePCA",
    "centroid_spread",
    "classifier_auroc",
    "gene_mean_ceiling",
    "gene_moment_spearman",
    "label_fidelity",
    "lfc_spearman",
    "log_fold_changes",
    "marker_overlap",
    "median_bandwidth",
    "mmd_rbf",
    "quality_report",
    "split_for_fitting",
    "top_markers",
    "wasserstein2",
    "zero_fraction",
    "zero_fraction_error",
]
