"""Small helpers shared across the package: seeds and progress bars."""

from __future__ import annotations

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
