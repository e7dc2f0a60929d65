"""Small helpers shared across the package: seeds, progress bars, names and warnings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np


def resolve_seed(seed: int | None) -> int:
    """The given seed, or a fresh one (callers record it so that a run can be repeated).

    Examples
    --------
    >>> resolve_seed(3)
    3
    """
    if seed is None:
        return int(np.random.default_rng().integers(2**31))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(
            f"seed must be a whole number >= 0 (or None for a fresh one), got {seed!r}."
        )
    return int(seed)


def progress(description: str, enabled: bool = True) -> Callable[[Iterable], Iterable] | None:
    """A wrapper that shows a tqdm progress bar over an iterable, or `None` when disabled.

    The samplers take it as ``progress=`` (one bar per long loop, as scvi-tools' ``track``).

    Examples
    --------
    >>> progress("Sampling", enabled=False) is None
    True
    """
    if not enabled:
        return None
    from scvi.utils import track

    def wrap(iterable: Iterable) -> Iterable:
        return track(iterable, description=description, style="tqdm")

    return wrap


def user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning names the first line outside scbranch.

    Call it in the function that warns: ``warnings.warn(..., stacklevel=user_stacklevel())``.
    A fixed stacklevel names the right line for one caller only (the few-cells warning of
    discovery named scbranch's own file when ``tl.branch_hierarchy`` called it). The command
    line counts as the user: its warnings stay scbranch's, which it prints as one line.

    Examples
    --------
    >>> user_stacklevel() >= 1
    True
    """
    import inspect
    import os

    package = os.path.dirname(os.path.abspath(__file__))
    cli = os.path.join(package, "cli")
    frame = inspect.currentframe().f_back  # the function that warns: stacklevel 1
    level = 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(package + os.sep) or name.startswith(cli + os.sep):
            break
        frame = frame.f_back
        level += 1
    return level


def as_names(value, name: str) -> list[str]:
    """``value`` as a list of distinct names: one string is one name, not its letters.

    Examples
    --------
    >>> as_names("CD19+ B", "labels"), as_names(["B", "NK"], "labels")
    (['CD19+ B'], ['B', 'NK'])
    """
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    repeated = sorted(v for v, n in Counter(names).items() if n > 1)
    if repeated:
        # generate's labels: a second mention meant more cells, which a dict says
        more = " (for more cells of some, a dict gives each its number)" if name == "labels" else ""
        raise ValueError(f"{name} names {repeated} more than once; name each once{more}.")
    return names
