"""extension.py's ``--head-floor``: the package's rule for a new type's steps, another floor.

The benchmark reads extension's floor by replacing the package's constant; the rule must then
give the new floor to a small type, leave a large type's 100 epochs alone, and the package's
own floor must come back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
extension = pytest.importorskip("extension")


def test_head_floor_moves_only_the_floor_of_the_packages_rule():
    from scbranch.module import _extension

    assert _extension.default_head_steps(77, 64, None) == 500  # 2 steps an epoch: the floor
    before = extension.set_head_floor(1_000)
    try:
        assert before == 500
        assert _extension.default_head_steps(77, 64, None) == 1_000
        assert _extension.default_head_steps(5_000, 64, None) == 7_900  # 100 epochs: above it
        assert _extension.default_head_steps(77, 64, 3) == 6  # max_epochs given: no floor
    finally:
        extension.set_head_floor(before)
    assert _extension.default_head_steps(77, 64, None) == 500


def test_head_floor_must_be_positive():
    with pytest.raises(SystemExit):
        extension.main(["--head-floor", "0", "--fast"])
