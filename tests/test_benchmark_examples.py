"""The examples in the benchmark scripts' docstrings run and hold.

tests/test_docstrings.py runs the package's examples; the scripts under benchmarks/ are not
part of the package, and an example there had drifted unnoticed (a variance ratio printed as
4.0 that was 3.8). Every script with an example is imported and its examples run.
"""

from __future__ import annotations

import doctest
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WITH_EXAMPLES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if ">>> " in p.read_text())


def test_some_scripts_have_examples():
    assert "latent_spread" in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_benchmark_examples_hold(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
    sys.modules.pop(name, None)
