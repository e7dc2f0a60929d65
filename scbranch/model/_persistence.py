"""Saving and loading models as tensors and plain data: a model directory cannot run code.

Layout of ``MODEL_DIR`` (file names take the save ``prefix``):

``model.safetensors``
    The network's parameters and buffers (safetensors: a header and raw tensors).
``model.json`` + ``model.npz``
    Everything else as plain data (``_plain.py``): the format version, the scvi-tools
    registry, the init parameters, the space (its name and state), the trained attributes
    (history, hierarchy record, reference cells, extensions).
``scvi/``
    scVI models only: the scVI model's weights (safetensors) and set-up (JSON + npz).
``adata.h5ad``
    With ``save_anndata=True``.

Models saved by scbranch < 0.2 are pickles (``model.pt``, and scvi-tools' own pickle in
``scvi/``). Unpickling runs whatever code the file holds, so those load only with
``trust_pickle=True``, and ``scbranch convert`` rewrites them once in this format.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from anndata import AnnData

from .._validation import check_genes_equal
from ..io._backed import backing_paths
from ._plain import NewerFormatError, PlainFormatError, read_plain, save_tensors, write_plain
from ._spaces import SPACES, ExpressionSpace, PcaSpace, ScviSpace, _SizeFactorCounts
from ._training_plan import DiffusionTrainingPlan

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

logger = logging.getLogger(__name__)

#: version of the model directory format (1: the pickles of scbranch < 0.2)
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
PLAIN = ("model.json", "model.npz")
LEGACY = "model.pt"


class UntrustedModelError(ValueError):
    """A model directory that can only be read by unpickling, refused without trust.

    Examples
    --------
    >>> try:  # doctest: +SKIP
    ...     sb.BranchedDiffusion.load("old_model/")
    ... except sb.model.UntrustedModelError:
    ...     model = sb.BranchedDiffusion.load("old_model/", trust_pickle=True)
    """


def _paths(directory: Path, prefix: str) -> dict[str, Path]:
    return {
        "weights": directory / f"{prefix}{WEIGHTS}",
        "json": directory / f"{prefix}{PLAIN[0]}",
        "npz": directory / f"{prefix}{PLAIN[1]}",
        "legacy": directory / f"{prefix}{LEGACY}",
        "adata": directory / f"{prefix}adata.h5ad",
    }


def _is_saved(name: str) -> bool:
    """Whether ``save`` writes the attribute ``name``: public, ending with ``_`` (scvi-tools')."""
    return name.endswith("_") and not name.startswith("_")


def _attributes(model) -> dict:
    """What scvi-tools saves of a model: every public attribute whose name ends with ``_``."""
    return {k: v for k, v in vars(model).items() if _is_saved(k)}


def save(
    self,
    dir_path: str | Path,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    **anndata_write_kwargs,
) -> None:
    """Save the model to ``dir_path`` as tensors and plain data (nothing that runs code).

    ``model.safetensors`` holds the weights; ``model.json`` and ``model.npz`` everything
    else, ``scvi/`` a nested scVI model (docs/security.md; the layout is in this module's
    docstring).

    Parameters
    ----------
    dir_path
        Directory to create.
    prefix
        Prefix of the saved file names.
    overwrite
        Replace the model files of an existing directory (otherwise an error).
    save_anndata
        Also save the registered AnnData (``adata.h5ad``).
    **anndata_write_kwargs
        Passed to :meth:`anndata.AnnData.write_h5ad`.

    Examples
    --------
    >>> model.save("pbmc_model/")  # doctest: +SKIP

    Under multi-device training (DDP) every process runs the script, but only process 0
    writes; the others return without touching ``dir_path``.
    """
    model, prefix = self, prefix or ""
    from lightning.pytorch.utilities import rank_zero_only

    rank = int(getattr(rank_zero_only, "rank", 0) or 0)
    if rank != 0:  # under DDP every process runs the script; one writes
        logger.info("Process %d does not save: only process 0 writes the model.", rank)
        return
    from .. import __version__

    directory = Path(dir_path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} is a file, not a directory.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} already exists and is not empty; pass overwrite=True to replace "
            "the model in it, or choose another directory."
        )
    if save_anndata and model.adata is None:
        raise ValueError("save_anndata=True, but the model holds no AnnData.")
    model.space.check_unchanged()  # before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    paths = _paths(directory, prefix)
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    plan = getattr(getattr(model, "trainer", None), "lightning_module", None)
    if isinstance(plan, DiffusionTrainingPlan) and plan.ema_weights():  # saved mid-training
        state.update({k: v.detach().cpu().contiguous() for k, v in plan.ema_weights().items()})
    tmp = paths["weights"].with_name(f".{paths['weights'].name}.tmp")
    try:
        save_tensors(state, tmp)
        tmp.replace(paths["weights"])
    finally:
        tmp.unlink(missing_ok=True)
    model.space.save_files(directory, prefix)
    content = {
        "package_version": __version__,
        "format_version": FORMAT_VERSION,
        "model_name": type(model).__name__,
        "space": {"name": model.space.name, "state": model.space.state()},
        "attributes": _attributes(model),
    }
    if not content["attributes"].get("data_source_"):
        # the file the cells were read from, when backed: generate(out=) refuses to replace it
        # even for the model loaded without them
        sources = sorted(backing_paths(model.adata))
        content["attributes"]["data_source_"] = str(sources[0]) if sources else None
    # the module is rebuilt from the init parameters' tree: save the tree as it is now (with
    # classes added and nodes named since training)
    init = content["attributes"]["init_params_"]
    content["attributes"]["init_params_"] = {
        **init,
        "non_kwargs": {**init["non_kwargs"], "hierarchy": model.tree.to_dict()},
    }
    write_plain(content, paths["json"], paths["npz"], kind="model")
    # a pickle left from an older save would be read by nobody but could fool a user
    paths["legacy"].unlink(missing_ok=True)
    legacy_scvi = directory / f"{prefix}{ScviSpace.DIRECTORY}" / LEGACY
    legacy_scvi.unlink(missing_ok=True)
    if not save_anndata:  # an overwritten directory must not keep the cells of the model before
        paths["adata"].unlink(missing_ok=True)
    if save_anndata:
        model.adata.write_h5ad(paths["adata"], **anndata_write_kwargs)


def _corrupt(directory: Path, err) -> ValueError:
    if isinstance(err, NewerFormatError):  # intact: the fix is a newer scbranch, not a retrain
        return ValueError(f"Could not load the model in {str(directory)!r}: {err}")
    return ValueError(
        f"Could not load the model in {str(directory)!r}: {str(err).rstrip('.')}. The directory "
        "is corrupt, partial, or from an incompatible version; retrain and save it again."
    )


def load(
    cls,
    dir_path: str | Path,
    adata: AnnData | None = None,
    *,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    trust_pickle: bool = False,
) -> BranchedDiffusion:
    """Load a saved model (:meth:`~scbranch.BranchedDiffusion.save`) without running its code.

    Parameters
    ----------
    dir_path
        Directory the model was saved to.
    adata
        Optional AnnData to attach (its genes/representation must match the model's).
    accelerator, device
        Where to put the model: Lightning's accelerator names (``"cpu"``, ``"gpu"``,
        ``"auto"``) and a device index (``device=1``: ``cuda:1``) or ``"auto"``.
    prefix
        Prefix of the saved file names.
    trust_pickle
        Models saved by scbranch < 0.2 are pickles, and loading a pickle runs whatever code
        it contains: pass `True` only for a directory whose origin you trust (convert it
        once with ``scbranch convert``). Without it such a directory is refused.

    Returns
    -------
    The model.

    Examples
    --------
    >>> model = BranchedDiffusion.load("pbmc_model/")  # doctest: +SKIP
    """
    prefix = prefix or ""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from scvi.model._utils import parse_device_args

    from .. import __version__

    directory = Path(dir_path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No model directory at {str(directory)!r}. Save one with `model.save(dir_path)`."
        )
    paths = _paths(directory, prefix)
    if not paths["json"].is_file():
        if paths["legacy"].is_file():
            if not trust_pickle:
                raise UntrustedModelError(
                    f"{str(directory)!r} holds a model saved by scbranch < 0.2 as a pickle "
                    f"({paths['legacy'].name}); loading a pickle runs any code it contains. If "
                    "you trust where it came from, load it with `trust_pickle=True` (CLI: "
                    "`scbranch convert DIR --out NEW_DIR --trust-pickle` rewrites it once as "
                    "plain data)."
                )
            return _load_legacy(cls, directory, paths, adata, accelerator, device, prefix)
        raise FileNotFoundError(
            f"{str(directory)!r} holds no '{paths['json'].name}': it is not (or not completely) "
            "a saved scbranch model."
        )
    try:
        content = read_plain(paths["json"], paths["npz"], kind="model")
        if not isinstance(content, dict):
            raise PlainFormatError(f"it holds a {type(content).__name__}, not a model record")
        saved_format = int(content.get("format_version", 0))
        if saved_format > FORMAT_VERSION:
            raise NewerFormatError(
                f"it was saved by scbranch {content.get('package_version')!r} in model format "
                f"version {saved_format}, and this scbranch ({__version__}) reads up to version "
                f"{FORMAT_VERSION}; upgrade scbranch to load it."
            )
        if content.get("model_name") != cls.__name__:
            raise PlainFormatError(
                f"it holds a {content.get('model_name')!r}, not a {cls.__name__}"
            )
        state = load_file(str(paths["weights"]), device="cpu")
    except (PlainFormatError, SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise _corrupt(directory, err) from err
    try:
        name = content["space"]["name"]
    except (KeyError, TypeError) as err:
        raise _corrupt(directory, PlainFormatError(f"no space recorded ({err!r})")) from err
    if not isinstance(name, str) or name not in SPACES:
        raise ValueError(
            f"The model in {str(directory)!r} diffuses a {name!r} space, which is not "
            f"registered (registered: {sorted(SPACES)}). Import the package that defines it."
        )
    try:
        space = SPACES[name].from_state(content["space"]["state"], directory, prefix)
    except NewerFormatError:
        raise
    except (PlainFormatError, SafetensorError, OSError) as err:
        raise _corrupt(directory, err) from err
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        damaged = PlainFormatError(f"its {name} space is damaged ({err!r})")
        raise _corrupt(directory, damaged) from err
    model = _rebuild(cls, content.get("attributes"), space, state, directory)
    if adata is None and paths["adata"].is_file():
        # saved with save_anndata=True: attached as scvi-tools does (anndata reads plain data)
        import anndata

        adata = anndata.read_h5ad(paths["adata"])
    return _finish(model, adata, accelerator, device, parse_device_args)


def load_registry(dir_path: str | Path, prefix: str | None = None) -> dict:
    """The scvi-tools registry saved with a model, read as plain data (no unpickling).

    Replaces scvi-tools' ``BaseModelClass.load_registry``, which reads a pickled ``model.pt``
    (scbranch writes none: a file planted there would run its code).

    Parameters
    ----------
    dir_path
        Directory the model was saved to.
    prefix
        Prefix of the saved file names.

    Returns
    -------
    The registry: ``setup_args``, ``field_registries`` and the model's name.

    Examples
    --------
    >>> BranchedDiffusion.load_registry("pbmc_model/")["setup_args"]  # doctest: +SKIP
    {'labels_key': 'cell_type', 'obsm_key': 'X_pca', ...}
    """
    directory = Path(dir_path)
    paths = _paths(directory, prefix or "")
    if not paths["json"].is_file():
        if paths["legacy"].is_file():
            raise UntrustedModelError(
                f"{str(directory)!r} holds a model saved by scbranch < 0.2 as a pickle "
                f"({paths['legacy'].name}), whose registry can only be read by unpickling it. "
                "If you trust where it came from, rewrite it once as plain data with "
                "`scbranch convert DIR --out NEW_DIR --trust-pickle`."
            )
        raise FileNotFoundError(
            f"{str(directory)!r} holds no '{paths['json'].name}': it is not (or not completely) "
            "a saved scbranch model."
        )
    try:
        content = read_plain(paths["json"], paths["npz"], kind="model")
        registry = content["attributes"]["registry_"]
        if not isinstance(registry, dict) or "setup_args" not in registry:
            raise PlainFormatError("its registry is damaged")
    except (PlainFormatError, KeyError, TypeError) as err:
        raise _corrupt(directory, err) from err
    return registry


def view_setup_args(dir_path: str | Path, prefix: str | None = None) -> None:
    """Print the ``setup_anndata`` arguments of a saved model, read as plain data.

    Replaces scvi-tools' version, which unpickles ``model.pt``
    (:func:`load_registry`).

    Parameters
    ----------
    dir_path
        Directory the model was saved to.
    prefix
        Prefix of the saved file names.

    Examples
    --------
    >>> BranchedDiffusion.view_setup_args("pbmc_model/")  # doctest: +SKIP
    Setup via `BranchedDiffusion.setup_anndata` with arguments: ...
    """
    from scvi.data import AnnDataManager

    AnnDataManager.view_setup_method_args(load_registry(dir_path, prefix))


def convert_legacy_save(cls, dir_path, output_dir_path, overwrite=False, prefix=None, **kwargs):
    """Refused: scvi-tools' converter is for its own pre-0.15 pickles, not scbranch's.

    A scbranch < 0.2 model (a pickle) is rewritten as plain data by
    :func:`~scbranch.model.convert_legacy` (``scbranch convert``), which unpickles it: only for
    models you trust.

    Examples
    --------
    >>> BranchedDiffusion.convert_legacy_save("old/", "new/")  # doctest: +SKIP
    Traceback (most recent call last):
    ValueError: ...
    """
    raise ValueError(
        "BranchedDiffusion.convert_legacy_save is scvi-tools' converter for scvi-tools' own "
        "pre-0.15 pickles and does not apply to scbranch models. A model saved by scbranch "
        "< 0.2 is rewritten as plain data by `scbranch.model.convert_legacy(old_dir, "
        "new_dir)` (CLI: `scbranch convert OLD --out NEW --trust-pickle`); it unpickles the "
        "old files, so convert only models you trust."
    )


def _rebuild(cls, attributes: dict, space, state: dict, directory: Path):
    """The model from its saved attributes, space and weights."""
    if not isinstance(attributes, dict):
        raise _corrupt(directory, PlainFormatError("it records no attributes"))
    # only what save writes (public names ending in "_", _attributes): a damaged or crafted
    # file must not replace the module, the space or a method
    foreign = sorted(k for k in attributes if not _is_saved(k))
    if foreign:
        damaged = PlainFormatError(f"it sets attributes {foreign}, which save never writes")
        raise _corrupt(directory, damaged)
    attributes = dict(attributes)
    try:
        registry = attributes.pop("registry_")
        init = attributes.pop("init_params_")
        # models saved before an option existed had what was then its only behaviour
        non_kwargs = {
            "gaussian_skip": "global",  # one global Gaussian
            "architecture": "branched",  # one head per branch, the default of scbranch 0.1
            **init["non_kwargs"],
            "space": space,
        }
        kwargs = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
        model = cls(None, registry=registry, **non_kwargs, **kwargs)
        for key, value in attributes.items():
            setattr(model, key, value)
        model.module.load_state_dict(state)
        broken = sorted(
            k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()
        )
        if broken:  # damaged bytes (safetensors has no checksum) or a diverged training
            raise ValueError(f"its weights {broken[:3]} hold NaN or inf values")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _corrupt(directory, err) from err
    model._model_summary_string = model._summary()
    return model


def device_request(accelerator: str, device: int | str | list) -> int | str | list:
    """``load``'s ``device`` as Lightning's ``devices``: an int is the device's INDEX.

    Lightning reads ``devices=1`` as "one device" (``cuda:0``) and ``devices=2`` as "two";
    ``load(dir, device=1)`` and the CLI's ``--device 1`` mean ``cuda:1``. CPUs have no index.
    """
    if isinstance(device, bool) or not isinstance(device, int | np.integer) or device < 0:
        return device  # "auto", a list or a string, as Lightning reads them
    accelerator = str(accelerator).lower()
    on_gpu = accelerator in ("gpu", "cuda", "mps") or (
        accelerator == "auto" and (torch.cuda.is_available() or torch.backends.mps.is_available())
    )
    return [int(device)] if on_gpu else "auto"


def _finish(model, adata, accelerator, device, parse_device_args):
    """Place the model on its device and attach ``adata`` (checked against the model)."""
    _, _, torch_device = parse_device_args(
        accelerator=accelerator,
        devices=device_request(accelerator, device),
        return_device="torch",
        validate_single_device=True,
    )
    model.to_device(torch_device)
    model.module.eval()
    if adata is not None:
        source = getattr(model.space, "scores_of", None)
        if source is not None and model.space.obsm_key not in adata.obsm:
            key = model.space.obsm_key  # out-of-fold scores: the training cells' only
            raise KeyError(
                f"The model learned out-of-fold scores obsm[{key!r}] (sb.tl.pca_out_of_fold), "
                f"which adata lacks: only training cells have them. New cells need not be "
                "attached: load without `adata` and pass them to `transmute` or "
                f"`generate_anchored`, which read their obsm[{source!r}] (the PCA projection). "
                f"To attach them anyway, give them adata.obsm[{key!r}] = adata.obsm[{source!r}]."
            )
        check_genes_equal(adata, np.asarray(model.get_var_names()).astype(str), "the saved model")
        if model.labels_key in adata.obs:
            present = adata.obs[model.labels_key].dropna().astype(str).unique()
            unknown = sorted(set(present) - set(model.classes))
            if unknown:
                raise ValueError(
                    f"adata.obs[{model.labels_key!r}] holds type(s) the model does not know: "
                    f"{unknown[:5]}. Attach only the cells of its types "
                    f"(`adata[adata.obs[{model.labels_key!r}].isin(model.classes)].copy()`), or "
                    "load without adata and add the new types with `model.add_classes(adata)`."
                )
        model.space.attach(adata, model.labels_key)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*already.*", category=UserWarning)
            model._validate_anndata(adata)
    return model


# ---------------------------------------------------------------------------- legacy
def _legacy_space(attr: dict, setup: dict, var_names, directory: Path, prefix: str, n_rep):
    """The space of a scbranch < 0.2 model, from its pickled attributes."""
    from ._scvi import load_scvi

    counts = None
    if attr.get("size_factors_") is not None and setup.get("counts_layer"):
        counts = _SizeFactorCounts(setup["counts_layer"], list(attr["size_factors_"]))
    if attr.get("scvi_info_") is not None:
        info = attr["scvi_info_"]
        vae = load_scvi(str(directory / f"{prefix}{ScviSpace.DIRECTORY}"), info)
        return ScviSpace(
            obsm_key=setup["obsm_key"], vae=vae, info=info, library_sizes=attr["library_sizes_"]
        )
    if setup.get("obsm_key"):
        return PcaSpace(
            obsm_key=setup["obsm_key"],
            layer=setup.get("layer"),
            n_dims=int(n_rep),
            decoder=attr.get("decoder_"),
            counts=counts,
        )
    return ExpressionSpace(layer=setup.get("layer"), genes=var_names, counts=counts)


#: attributes of scbranch < 0.2 that now live in the space
_LEGACY_SPACE_ATTRIBUTES = ("decoder_", "scvi_info_", "library_sizes_", "size_factors_")


def _load_legacy(cls, directory: Path, paths: dict, adata, accelerator, device, prefix):
    """Read a scbranch < 0.2 pickle (trusted by the caller) into today's model."""
    from scvi.data import AnnDataManager
    from scvi.model._utils import parse_device_args

    logger.warning(
        "Unpickling %s because trust_pickle=True; convert it once with `scbranch convert`.",
        paths["legacy"],
    )
    try:
        saved = torch.load(paths["legacy"], map_location="cpu", weights_only=False)
        attr = dict(saved["attr_dict"])
        registry = attr["registry_"]
        stats = AnnDataManager._get_summary_stats_from_registry(registry)
        space = _legacy_space(
            attr,
            registry["setup_args"],
            np.asarray(saved["var_names"]).astype(str),
            directory,
            prefix,
            stats.get("n_rep", 0),
        )
    except Exception as err:  # noqa: BLE001 - any failure of an old pickle means "corrupt"
        raise _corrupt(directory, err) from err
    for key in _LEGACY_SPACE_ATTRIBUTES:
        attr.pop(key, None)
    model = _rebuild(cls, attr, space, saved["model_state_dict"], directory)
    return _finish(model, adata, accelerator, device, parse_device_args)


def check_convertible(old_dir: str | Path) -> None:
    """Refuse what holds no old model: nothing to convert (or to trust).

    A missing path, a file, a directory without ``model.pt``, or one already in today's format;
    checked before anyone is asked to trust a pickle that is not there.
    """
    old = Path(old_dir)
    if not old.is_dir():
        what = "a file, not a model directory" if old.exists() else "does not exist"
        raise FileNotFoundError(f"{str(old)!r} {what}: give the directory of a saved model.")
    if not (old / LEGACY).is_file() and not (old / "model.json").is_file():
        raise FileNotFoundError(
            f"{str(old)!r} holds no {LEGACY}: it is not a model saved by scbranch < 0.2 (nothing "
            "to convert)."
        )
    if (old / "model.json").is_file() and not (old / LEGACY).is_file():
        raise ValueError(
            f"{str(old)!r} is already in today's format (model.json, no pickle): there is "
            "nothing to convert; load it with `BranchedDiffusion.load`."
        )


def convert_legacy(old_dir, new_dir, *, overwrite: bool = False) -> Path:
    """Rewrite a trusted scbranch < 0.2 model directory in today's format (no pickle).

    Parameters
    ----------
    old_dir
        Directory of a model saved by scbranch < 0.2. It is loaded with
        ``trust_pickle=True`` (its pickle runs code): convert only models you trust. It is
        left as it is.
    new_dir
        Directory to write the converted model to; must not be ``old_dir``.
    overwrite
        Replace the model's files in an existing ``new_dir`` (other files there are left);
        otherwise a non-empty ``new_dir`` raises a `FileExistsError`. A ``new_dir`` that
        holds ``old_dir`` is refused either way.

    Returns
    -------
    ``new_dir`` as a :class:`~pathlib.Path`.

    Examples
    --------
    >>> convert_legacy("old_model/", "new_model/")  # doctest: +SKIP
    """
    from ._model import BranchedDiffusion

    old, new_dir = Path(old_dir), Path(new_dir)
    check_convertible(old)
    if new_dir.resolve() == old.resolve() or new_dir.resolve() in old.resolve().parents:
        # saving there would mix the two; a directory above it would hold the old one
        raise ValueError(
            f"Convert into a directory of its own, not {str(new_dir)!r}, which holds "
            f"{str(old)!r}; the old model is left as it is."
        )
    model = BranchedDiffusion.load(old, trust_pickle=True, accelerator="cpu")
    # overwrite replaces the model's files in new_dir (as save does), never other files
    model.save(new_dir, overwrite=overwrite)
    return new_dir
