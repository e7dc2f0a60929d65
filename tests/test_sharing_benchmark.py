"""The sharing benchmark's model rows (benchmarks/quality.py ``model_options``), on known answers.

``unshared`` must give every type its own branch function wherever the types differ (below
t = 0.90); a misspelt variant must not silently
train the default model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")


def test_unshared_tree_gives_every_type_its_own_function_below_the_threshold():
    classes = ["A", "B", "C", "D"]
    tree = quality.unshared_tree(classes)
    for c in range(len(classes)):
        for t in (0.0, 0.5, 0.89):
            branch = tree.branches[int(tree.lookup(np.array([c]), t)[0])]
            assert branch.classes == (c,)
    # above the last join all types share one function (the root)
    root = tree.branches[int(tree.lookup(np.array([0]), 0.99)[0])]
    assert set(root.classes) == set(range(len(classes)))
    assert min(b.t_start for b in tree.branches if b.children) == quality.UNSHARED_FROM


def test_model_options_reads_every_variant_and_refuses_unknown_ones():
    assert quality.model_options("conditioned") == {"architecture": "conditioned"}
    assert quality.model_options("branched:per_branch")["gaussian_skip"] == "per_branch"
    assert quality.model_options("branched:late")["discovery_kwargs"] == {"epsilon": 0.0}
    options = quality.model_options("branched:unshared", ["A", "B"])
    assert options["hierarchy"].n_classes == 2
    with pytest.raises(ValueError, match="Unknown variant"):
        quality.model_options("branched:unshraed")
