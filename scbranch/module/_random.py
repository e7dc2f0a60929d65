"""Seeded noise for the samplers, the same on every device.

Generators live on the CPU and noise is drawn there, then moved: a CUDA generator with the
same seed draws other numbers, and a model's cells would then depend on where it runs.
"""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(seed: int, kind: int, key: int) -> torch.Generator:
    """A CPU generator for one stream of a sampler run; draw from it with :func:`normal`."""
    state = np.random.SeedSequence([int(seed) % 2**32, kind, key]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def normal(shape, gen: torch.Generator, device: torch.device, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``gen``, then moved to ``device``.

    A CUDA generator with the same seed draws other numbers than a CPU one (the GPU check in
    docs/benchmarks/gpu.md found other cells, not rounding), so every sampler draws here: the
    same seed gives the same cells, up to float rounding, on any device. The copy costs little
    next to a network call on the same rows.

    Examples
    --------
    >>> a = normal((2, 3), torch.Generator().manual_seed(0), torch.device("cpu"))
    >>> torch.equal(a, torch.randn((2, 3), generator=torch.Generator().manual_seed(0)))
    True
    """
    # on the CPU (the generator's device) whatever torch's default device
    return torch.randn(shape, generator=gen, dtype=dtype, device="cpu").to(device)
