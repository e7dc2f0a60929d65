"""Spread calibration: generated cells with their type's within-type spread, per dimension.

A score network trained on a few dozen cells of a type smooths their distribution, like a kernel
density estimate does: its cells come out wider than the type's cells. On pbmc68k_reduced the
default's latents were 20-26 % too wide in the trailing principal components
(docs/benchmarks/latent_spread.md). The correction is Silverman's variance correction of a
smoothed bootstrap, with the generator's spread measured instead of a known bandwidth: once per
type and sampler, :data:`CALIBRATION_CELLS` cells of the type are generated; every generated cell
of the type is then moved towards (or away from) the centre of those cells, per dimension, by the
ratio of the type's training standard deviation to the generated one,
``centre + factor * (x - centre)``. The centre is kept, so are the cells' ranks and shapes.

Each type is calibrated on its own seeded run, on the step grid of its own branch points, so its
factors depend on its own function and the sampler only: adding types (``add_classes``) leaves
them as they were, bit for bit.
The factors are measured lazily, for the types and sampler a call asks for, and kept until the
network changes (``train``, ``add_classes``; a loaded model measures them again, to the same
values on the same kind of device).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

logger = logging.getLogger(__name__)

#: cells per type generated to measure the sampler's spread (the factor's relative standard
#: error is about 1 / sqrt(2 * CALIBRATION_CELLS), 3 %)
CALIBRATION_CELLS = 500
#: seed of the calibration runs (type k uses ``SeedSequence([CALIBRATION_SEED, k])``)
CALIBRATION_SEED = 0x5C0B
#: sampler options that change the cells' distribution (``share`` and ``batch_size`` do not)
SAMPLER_KEYS = ("solver", "n_steps", "spacing")


@dataclass(frozen=True)
class TypeCalibration:
    """Per-dimension factor and centre of one type's generated cells (data units).

    Examples
    --------
    >>> cal = TypeCalibration(factor=np.array([0.5, 1.0]), centre=np.array([1.0, 0.0]))
    >>> cal.apply(np.array([[3.0, 2.0]]))
    array([[2., 2.]])
    """

    factor: np.ndarray
    centre: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Cells of this type with the training cells' spread around the generated centre."""
        return self.centre + self.factor * (x - self.centre)


def class_variances(stats: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
    """Per class and dimension, the variance of the training cells (data units).

    ``stats`` as :func:`~scbranch.module._gaussian_skip.class_statistics` returns them (on cells
    standardised with the scalar ``scale``, second moments per dimension); one pass over the
    cells, so an atlas on disk is read once.

    Examples
    --------
    >>> from scbranch.module._gaussian_skip import class_statistics
    >>> x = np.array([[0.0], [2.0], [10.0], [14.0]])
    >>> stats = class_statistics([(0, 4, x)], np.array([0, 0, 1, 1]), 2, 0.0, 1.0, False)
    >>> class_variances(stats, scale=1.0).ravel().tolist()
    [2.0, 8.0]
    """
    counts = stats["counts"][:, None]
    second = stats["second"]
    if second.ndim == 3:
        second = np.einsum("cii->ci", second)
    scatter = second - stats["sums"] ** 2 / np.maximum(counts, 1.0)
    return np.maximum(scatter, 0.0) / np.maximum(counts - 1.0, 1.0) * scale**2


def calibrate_type(generated: np.ndarray, variance: np.ndarray) -> TypeCalibration:
    """The factors that give ``generated`` cells of one type the training ``variance``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> wide = 3.0 + 2.0 * rng.normal(size=(20000, 2))
    >>> cal = calibrate_type(wide, variance=np.ones(2))
    >>> cal.factor.round(2).tolist(), cal.apply(wide).std(0).round(2).tolist()
    ([0.5, 0.5], [1.0, 1.0])
    """
    generated = np.asarray(generated, dtype=np.float64)
    spread = generated.var(0, ddof=1)
    # a dimension the sampler leaves flat (or the type's cells do) is left as it is
    factor = np.where(spread > 1e-12, np.sqrt(variance / np.maximum(spread, 1e-12)), 1.0)
    return TypeCalibration(factor=factor, centre=generated.mean(0))


def calibration_seed(code: int) -> int:
    """Seed of type ``code``'s calibration run (its own stream, whatever the other types)."""
    state = np.random.SeedSequence([CALIBRATION_SEED, int(code)])
    return int(state.generate_state(1)[0])


def type_calibrations(
    model: BranchedDiffusion, codes, sample_options: Mapping
) -> dict[int, TypeCalibration] | None:
    """Calibrations of the types ``codes`` for a sampler (measured once, then kept).

    ``codes`` may be a mapping (its keys are read). `None` for a model without the training
    cells' variances (saved before scbranch measured them).
    """
    variances = getattr(model, "class_variances_", None)
    if variances is None:
        logger.info(
            "This model has no per-type training variances (saved before scbranch measured "
            "them); its cells are not spread-calibrated. Retrain it to calibrate them."
        )
        return None
    options = {name: sample_options.get(name) for name in SAMPLER_KEYS}
    kept = model._spread_calibrations.setdefault(tuple(options.values()), {})
    for code in sorted(set(int(c) for c in codes) - set(kept)):
        # one type per run, on the grid of its own branch points (share=True builds the grid
        # from the types requested; share=False from every type's, which a new type changes)
        res = model.module.sample_cells(
            {code: CALIBRATION_CELLS}, share=True, seed=calibration_seed(code), **options
        )
        kept[code] = calibrate_type(res.x.cpu().double().numpy(), np.asarray(variances[code]))
        logger.debug("spread factors of %s: %s", model.classes[code], kept[code].factor)
    return kept


def forget_calibrations(model: BranchedDiffusion) -> None:
    """Drop the measured factors (the network changed: training, new types)."""
    model._spread_calibrations = {}


def calibrated(z: np.ndarray, codes: np.ndarray, calibrations: Mapping[int, TypeCalibration]):
    """Generated cells ``z`` (types ``codes``) moved to their types' training spread.

    Examples
    --------
    >>> cal = {0: TypeCalibration(np.array([0.5]), np.array([0.0]))}
    >>> calibrated(np.array([[2.0], [4.0]]), np.array([0, 0]), cal).ravel().tolist()
    [1.0, 2.0]
    """
    out = np.array(z, dtype=np.float64, copy=True)
    for code in np.unique(codes):
        rows = codes == code
        out[rows] = calibrations[int(code)].apply(out[rows])
    return out.astype(np.asarray(z).dtype, copy=False)
