"""benchmarks/latent_spread.py: the known answers of its per-component spread.

Two samples of one distribution read a variance ratio of 1 and no shift beyond sampling noise;
a set with twice the spread in the trailing components reads 4 there and 1 in the leading ones,
and the bands aggregate by geometric mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
latent_spread = pytest.importorskip("latent_spread")


def test_same_distribution_reads_one_and_wider_trailing_components_read_four():
    rng = np.random.default_rng(0)
    n, d = 20_000, 30
    sd = np.linspace(3.0, 0.3, d)  # leading components wide, trailing ones narrow
    labels = np.repeat(["A", "B"], n // 2)
    centre = np.where(labels[:, None] == "A", 1.0, -1.0) * np.ones(d)
    reference = centre + sd * rng.normal(size=(n, d))
    same = centre + sd * rng.normal(size=(n, d))
    wider = same.copy()
    wider[:, 20:] = centre[:, 20:] + 2 * sd[20:] * rng.normal(size=(n, 10))
    rows = latent_spread.spread_rows(
        {"probe: unseen real cells": (same, labels), "wider": (wider, labels)},
        reference,
        labels,
        ["A", "B"],
    )
    table = latent_spread.band_table(rows)
    known = table.loc["probe: unseen real cells"]
    assert np.allclose(known.filter(like="variance"), 1.0, atol=0.05)
    assert (known.filter(like="shift") < 0.05).all()
    assert table.loc["wider", "variance, PCs 1-5"] == pytest.approx(1.0, abs=0.05)
    assert table.loc["wider", "variance, PCs 21-30"] == pytest.approx(4.0, rel=0.05)
    assert list(table.index[:1]) == ["probe: unseen real cells"]  # the report's order


def test_bands_aggregate_by_geometric_mean_and_leave_empty_bands_empty():
    rows = pd.DataFrame(
        {"row": "x", "component": [1, 2, 30], "ratio": [1.0, 4.0, 2.0], "shift": [0.0, 0.0, 3.0]}
    )
    values = latent_spread.band_table(rows).loc["x"]
    assert values["variance, PCs 1-5"] == pytest.approx(2.0)
    assert values["variance, PCs 21-30"] == pytest.approx(2.0)
    assert values["shift, PCs 21-30"] == pytest.approx(3.0)
    assert np.isnan(values["variance, PCs 6-10"])


def test_new_cells_read_one_and_cells_between_the_training_cells_read_more():
    """Known answer of the nearest-training-cell ratio: new cells of the training cells'
    distribution read 1; cells spread evenly over the box the training cells span (same
    spread, no structure) lie farther from them."""
    rng = np.random.default_rng(1)
    # training cells on two tight lines: the type has structure a smoother fills in
    t = rng.uniform(-2, 2, size=(120, 1))

    def cells(n):
        u = rng.uniform(-2, 2, size=(n, 1))
        side = rng.choice([-1.0, 1.0], size=(n, 1))
        return np.hstack([u, side + 0.05 * rng.normal(size=(n, 1))])

    train = np.hstack([t, rng.choice([-1.0, 1.0], size=(120, 1))])
    lab = lambda n: np.array(["a"] * n)  # noqa: E731
    latents = {
        "new": (cells(300), lab(300)),
        "filled": (rng.uniform(-2, 2, size=(300, 2)), lab(300)),
    }
    out = latent_spread.nearest_rows(latents, train, lab(120), cells(300), lab(300), ["a"])
    out = out.set_index("row")
    assert abs(out.loc["new", "all"] - 1) < 0.15
    assert out.loc["filled", "all"] > 1.5
