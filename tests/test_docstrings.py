"""Every public function and class of the API has a numpydoc docstring with an example that runs.

The documentation site renders these docstrings (``make docs``); this test is what fails when a
public object has no example, and it runs every example not marked ``# doctest: +SKIP`` (those
that train a model or read files), so an example cannot drift from the code it shows.
"""

from __future__ import annotations

import doctest
import inspect
import logging
import sys

import pytest

import scbranch as sb

#: the sub-packages whose ``__all__`` is the public API (the documentation renders them)
PUBLIC = ["tl", "pl", "metrics", "datasets", "baselines", "model", "module", "io"]


def _public_objects() -> dict[str, object]:
    seen = {}
    for sub in PUBLIC:
        module = getattr(sb, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen[f"scbranch.{sub}.{name}"] = obj
    model = sb.BranchedDiffusion
    seen["scbranch.BranchedDiffusion"] = model
    for name, member in vars(model).items():
        if not name.startswith("_") and (
            inspect.isfunction(member) or isinstance(member, classmethod | staticmethod)
        ):
            seen[f"scbranch.BranchedDiffusion.{name}"] = getattr(model, name)
    return seen


def example_problem(obj: object) -> str | None:
    """Why ``obj``'s docstring fails the rule, or `None` when it has an example with code."""
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return "has no docstring"
    if "Examples\n--------" not in doc:
        return "has no Examples section"
    if ">>>" not in doc.split("Examples\n--------", 1)[1]:
        return "has an Examples section without code (>>>)"
    return None


OBJECTS = _public_objects()


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_public_object_has_a_docstring_with_an_example(name):
    problem = example_problem(OBJECTS[name])
    assert problem is None, f"{name} {problem}; add a numpydoc Examples section with >>> lines."


def test_the_rule_catches_missing_and_empty_examples():
    def undocumented(): ...

    def no_example():
        """Does something."""

    def prose_example():
        """Does something.

        Examples
        --------
        Call it.
        """

    def good():
        """Does something.

        Examples
        --------
        >>> good()
        """

    assert example_problem(undocumented) == "has no docstring"
    assert example_problem(no_example) == "has no Examples section"
    assert example_problem(prose_example) == "has an Examples section without code (>>>)"
    assert example_problem(good) is None


@pytest.fixture
def quiet(monkeypatch):
    """What a user sees besides the example's values (log lines, progress bars) is not checked."""
    import scvi.utils

    monkeypatch.setattr(scvi.utils, "track", lambda iterable, **kwargs: iterable)
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def _run_examples(name: str, obj: object) -> doctest.TestResults:
    func = obj.__func__ if inspect.ismethod(obj) else obj
    module = sys.modules[func.__module__]
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    for test in finder.find(func, name, module=module, globs=dict(vars(module))):
        runner.run(test, out=report.append)
    return runner.summarize(verbose=False), "".join(report)


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_public_examples_run(name, quiet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    (failed, attempted), report = _run_examples(name, OBJECTS[name])
    assert failed == 0, f"{name}: {failed} of {attempted} example lines failed:\n{report}"


def test_a_wrong_example_fails(quiet):
    def wrong():
        """Adds.

        Examples
        --------
        >>> 1 + 1
        3
        """

    wrong.__module__ = __name__
    (failed, attempted), report = _run_examples("wrong", wrong)
    assert (failed, attempted) == (1, 1)
    assert "Expected:\n    3\nGot:\n    2" in report
