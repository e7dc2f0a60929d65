"""An scVI model's latent means (``space="scvi"``), decoded by scVI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from ..._keys import Key
from ..._validation import (
    check_finite,
    check_obs_key,
    get_matrix,
)
from .._counts import (
    class_pools,
    draw_from_pools,
    log_normalize,
)
from .._scvi import (
    SCVI_DIR,
    check_weights_unchanged,
    decode_latents,
    decoder_scale,
    default_batch,
    expected_log_counts,
    latent_of,
    library_sizes_of,
    load_scvi_weights,
    normalized_counts,
    save_scvi_weights,
    scvi_info,
    weights_fingerprint,
)
from ._base import Decoded, Space, TopologySource, register_space

logger = logging.getLogger(__name__)

#: counts per cell at which the default tree's topology is learned (scanpy's usual CP10k)
TOPOLOGY_TARGET_SUM = 1e4


@register_space
class ScviSpace(Space):
    """The latent means of a trained scVI (or LinearSCVI) model, decoded through it.

    Generated latents go through scVI's decoder with a library size drawn from the requested
    type and a batch; counts are sampled from its likelihood. With ``counts=False`` no counts
    are kept: ``.X`` is each latent's expected log-normalised counts (each gene's
    expectation of CP10k + log1p over the likelihood's counts, summed exactly), the denoised
    profile in real cells' units.

    Parameters
    ----------
    vae
        The scvi-tools model.
    info
        What the model records about its scVI model (genes, batches, likelihood, ...).
    library_sizes
        Observed library sizes per class.
    estimate_library
        Library size of the expression decoded along trajectories (default: the median of
        ``library_sizes``); fixed when the space is fitted, so adding types leaves it.
    **kwargs
        Passed on to the base space: ``obsm_key``, the ``obsm`` key holding the latent means.

    Examples
    --------
    >>> model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type")  # doctest: +SKIP
    >>> model.space  # doctest: +SKIP
    ScviSpace(SCVI latent obsm['X_scVI'])
    """

    name = "scvi"
    #: sub-directory of a saved model with the scVI model's weights and set-up
    DIRECTORY = SCVI_DIR

    def __init__(
        self,
        *,
        vae,
        info: dict,
        library_sizes: list,
        estimate_library: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vae = vae
        self.info = info
        self.library_sizes = list(library_sizes)
        if estimate_library is None:
            estimate_library = np.median(np.concatenate(self.library_sizes))
        #: library size of trajectories' expression: one value for every row, so that a
        #: gene's trend along a trajectory is the latent's change and not the library's
        self.estimate_library = float(estimate_library)

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, *, scvi_model=None, **kwargs):  # noqa: D102
        obsm_key = setup.get("obsm_key")
        if scvi_model is None or obsm_key is None:
            raise ValueError(
                "The scVI space needs AnnData set up with `obsm_key` naming the latent means of "
                "`scvi_model=`; `BranchedDiffusion.from_scvi_model(scvi_model, labels_key=...)` "
                "does both."
            )
        info = scvi_info(scvi_model)
        latent = np.asarray(get_matrix(adata, obsm_key=obsm_key))
        if latent.shape[1] != info["n_latent"]:
            raise ValueError(
                f"adata.obsm[{obsm_key!r}] has {latent.shape[1]} dimensions but the scVI "
                f"model's latent has {info['n_latent']}: it is not this model's latent."
            )
        # the diffusion must learn the latents the decoder expects: check a sample of cells
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, min(256, adata.n_obs), False))
        expected = latent_of(scvi_model, adata, info, rows)
        err = np.linalg.norm(latent[rows] - expected) / max(np.linalg.norm(expected), 1e-12)
        if not err <= 1e-3:
            raise ValueError(
                f"adata.obsm[{obsm_key!r}] is not the scVI model's latent mean (relative "
                f"difference {err:.3g}). Store `scvi_model.get_latent_representation()` there, "
                "or use `BranchedDiffusion.from_scvi_model`."
            )
        library = library_sizes_of(adata, info)
        info["default_batch"] = default_batch(adata, info)
        info["weights_sha256"] = weights_fingerprint(scvi_model)  # checked before every use
        return cls(
            obsm_key=obsm_key,
            vae=scvi_model,
            info=info,
            library_sizes=class_pools(library, labels, n_classes),
            estimate_library=np.median(library),  # the training cells'
        )

    @staticmethod
    def store_latent(vae, adata: AnnData | None, obsm_key: str, labels_key: str) -> AnnData:
        """Write ``vae``'s latent means of ``adata`` to ``obsm[obsm_key]`` (or check them).

        An existing entry is reused only if it holds the same latents: scbranch never
        overwrites it. ``adata`` defaults to the AnnData the scVI model was set up with.
        """
        info = scvi_info(vae)
        if adata is None:
            adata = vae.adata
            if adata is None:
                raise ValueError("The scVI model holds no AnnData; pass `adata=`.")
            if labels_key not in adata.obs.columns:
                # e.g. sb.model.fit_scvi's model, set up on a counts-only copy of the data
                raise KeyError(
                    f"labels_key={labels_key!r} is not a column of the AnnData the scVI model "
                    f"holds (columns: {list(adata.obs.columns)}): pass the annotated cells, "
                    "`from_scvi_model(vae, labels_key=..., adata=adata)`."
                )
        check_obs_key(adata, labels_key)
        latent = latent_of(vae, adata, info)
        if obsm_key in adata.obsm:
            stored = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
            if stored.shape != latent.shape or not np.allclose(stored, latent, atol=1e-4):
                raise ValueError(
                    f"adata.obsm[{obsm_key!r}] exists and is not this scVI model's latent mean; "
                    "pass another `obsm_key=` (scbranch never overwrites it) or delete it."
                )
        else:
            adata.obsm[obsm_key] = latent
        return adata

    def attach(self, adata, labels_key) -> None:  # noqa: D102
        # the latent is the scVI model's function of the counts: new cells get it here, as
        # from_scvi_model(vae, adata=...) writes it (an existing obsm entry is only checked)
        self.store_latent(self.vae, adata, self.obsm_key, labels_key)

    def topology_source(self, adata) -> TopologySource:  # noqa: D102
        # scVI latents lose coarse clades that the expression keeps (a simulated atlas's true
        # tree and two annotations, docs/benchmarks/latent_tree.md), and the expression's
        # topology costs nothing in the cells (docs/benchmarks/expression_tree.md): the
        # topology comes from the counts scVI models, normalised as scanpy users do, and the
        # branch times from the latent the diffusion runs in
        layer = self.info["layer"] or None
        genes = adata.var_names.astype(str)
        mismatch = None  # the same genes in any order give the same tree
        if len(genes) != len(self.var_names) or set(genes) != set(self.var_names):
            mismatch = f"adata holds {adata.n_vars} genes, the scVI model {len(self.var_names)}"
        return TopologySource(
            normalized_counts(adata, self.info, TOPOLOGY_TARGET_SUM),
            None,
            layer,
            TOPOLOGY_TARGET_SUM,
            mismatch,
        )

    @property
    def n_input(self) -> int:  # noqa: D102
        return int(self.info["n_latent"])

    @property
    def var_names(self) -> np.ndarray:  # noqa: D102
        return np.asarray(self.info["var_names"]).astype(str)

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        self.check_unchanged()
        x = latent_of(self.vae, adata, self.info)
        check_finite(x, f"the representation of {what}")
        return x

    def class_data(self, adata, what):  # noqa: D102
        return self.encode(adata, what), {"library": library_sizes_of(adata, self.info)}

    def add_class(self, extras) -> None:  # noqa: D102
        new = class_pools(extras["library"], np.zeros(len(extras["library"]), int), 1)
        self.library_sizes = [*self.library_sizes, *new]

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if residual_noise:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                f"(diffusing {self.describe()}) has no PCA decoder."
            )
        batches = list(self.info["batches"])
        if batch is not None and (not self.info["batch_key"] or batch not in batches):
            raise ValueError(
                f"Unknown batch {batch!r}; the scVI model's batches are {batches}."
                if self.info["batch_key"]
                else "The scVI model was set up without batches; drop `batch=`."
            )
        if self.info["batch_key"] and batch is None:
            batch = self.info["default_batch"]
        # counts=False: the expected log-normalised counts, no counts drawn to keep
        return {"counts": counts is not False, "batch": batch, "residual_noise": False}

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        info = self.info
        self.check_unchanged()
        batch = options.get("batch") or info["default_batch"]  # "" without batches
        batch_code = list(info["batches"]).index(batch)
        library = draw_from_pools(self.library_sizes, codes, np.random.default_rng([seed, 2]))
        batch_index = np.full(len(z), batch_code)
        if options["counts"]:
            scale, sampled = decode_latents(self.vae, z, library, batch_index, seed)
            x, layers = log_normalize(sampled), {Key.layers.COUNTS: sampled}
        else:  # no counts kept: no draw of them beyond the expectation's
            scale = decoder_scale(self.vae, z, library, batch_index)
            x, layers = expected_log_counts(self.vae, z, library, batch_index), {}
        out = Decoded(
            X=x,
            var_names=self.var_names,
            layers={**layers, Key.layers.SCALE: scale},
            obs={Key.obs.LIBRARY_SIZE: library},
        )
        if info["batch_key"]:
            out.obs[info["batch_key"]] = pd.Categorical(
                [batch] * len(z), categories=list(info["batches"])
            )
        return out

    def layers_made(self, options) -> list[str]:  # noqa: D102
        return [Key.layers.COUNTS, Key.layers.SCALE] if options["counts"] else [Key.layers.SCALE]

    def bytes_per_cell(self, options) -> int:  # noqa: D102
        # scVI's normalised expression (float32, gathered from chunks) and the sparse counts
        return len(self.var_names) * 16

    def decode_estimates(self, z, batch: str | None = None) -> np.ndarray:  # noqa: D102
        # expected log-normalised counts, as generate(counts=False) gives: in real cells'
        # units (the mean of logs), where log1p of the decoder's mean lies above them for
        # rarely expressed genes (docs/api.md, 'Trajectory AnnData'); in `batch` (default:
        # the most common one)
        self.check_unchanged()
        batch_code = list(self.info["batches"]).index(batch or self.info["default_batch"])
        # no progress bar of its own: say what a large transmutation's decode is doing
        logger.info(
            "Decoding %d trajectory rows through scVI: each row's expected log-normalised "
            "counts at library size %g.",
            len(z),
            self.estimate_library,
        )
        return expected_log_counts(
            self.vae,
            z,
            np.full(len(z), self.estimate_library, dtype=np.float32),
            np.full(len(z), batch_code),
        )

    def estimate_obs(self, batch: str | None = None) -> dict:  # noqa: D102
        obs = {Key.obs.LIBRARY_SIZE: np.float32(self.estimate_library)}
        if self.info["batch_key"]:  # one row's value: trajectory_anndata repeats it
            batches = list(self.info["batches"])
            obs[self.info["batch_key"]] = pd.Categorical(
                [batch or self.info["default_batch"]], categories=batches
            )
        return obs

    def describe(self) -> str:  # noqa: D102
        return f"{self.info['class']} latent obsm[{self.obsm_key!r}]"

    def state(self) -> dict:  # noqa: D102
        return {
            **super().state(),
            "info": self.info,
            "library_sizes": self.library_sizes,
            "estimate_library": self.estimate_library,
        }

    def check_unchanged(self) -> None:  # noqa: D102
        check_weights_unchanged(self.vae, self.info)

    def save_files(self, directory: Path, prefix: str = "") -> None:  # noqa: D102
        self.check_unchanged()  # save checks it first too: this keeps the method safe alone
        save_scvi_weights(self.vae, Path(directory) / f"{prefix}{self.DIRECTORY}")

    @property
    def nested_model(self):  # noqa: D102
        return self.vae

    def to_device(self, device) -> None:  # noqa: D102
        self.vae.to_device(device)

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        if directory is None:
            raise ValueError("An scVI space is loaded from a model directory.")
        info = dict(state["info"])
        where = Path(directory) / f"{prefix}{cls.DIRECTORY}"
        vae = load_scvi_weights(where, info)
        # the weights beside the model must be those it was trained on (a replaced scvi/ is
        # refused); models saved before the fingerprint record it now
        check_weights_unchanged(vae, info, f" in {str(where)!r}")
        info.setdefault("weights_sha256", weights_fingerprint(vae))
        return cls(
            obsm_key=state["obsm_key"],
            vae=vae,
            info=info,
            library_sizes=list(state["library_sizes"]),
            estimate_library=state.get("estimate_library"),  # saved before it: None
        )
