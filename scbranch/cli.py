"""Command line of scbranch: ``scbranch demo``, ``scbranch fit`` and ``scbranch generate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

from .module._solvers import (
    DEFAULT_ANCHOR_TIME,
    DEFAULT_N_STEPS,
    DEFAULT_SOLVER,
    SOLVERS,
    solver_names,
)

logger = logging.getLogger(__name__)

PROG = "scbranch"
#: Exit status of a run stopped by bad user input (same as argparse's usage errors).
EXIT_USAGE = 2
#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130

# Exceptions that mean "the input was wrong": reported as one line, never as a traceback.
# FileNotFoundError, FileExistsError and PermissionError are OSErrors.
_USER_ERRORS: tuple[type[BaseException], ...] = (KeyError, ValueError, OSError)


class CLIError(Exception):
    """An error of the command line's input, reported as one line with exit status 2."""


# ---------------------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"the seed must be in [0, 2**32), got {text!r}")
    return value


def _devices(text: str) -> int | str | list[int]:
    """``auto``, a device count (``2``, ``-1`` for all) or a list of device indices (``0,1``)."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a number of devices or a comma-separated list of device indices, "
            f"got {text!r}"
        ) from None


# ---------------------------------------------------------------------------- helpers
def _one_line(err: BaseException) -> str:
    """Return the message of ``err`` on one line (a ``KeyError``'s without repr quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        msg = str(err.args[0])
    else:
        msg = str(err)
    msg = " ".join(msg.split())
    return msg or type(err).__name__


def _check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to write a model into a file or a non-empty directory unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {str(path)!r} is a file, not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {str(path)!r} exists and is not empty; choose another directory or pass "
            "--overwrite to replace the model in it."
        )


def _check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file or store unless ``overwrite`` (or a directory)."""
    if path.is_dir() and path.suffix != ".zarr":
        raise FileExistsError(
            f"--out {str(path)!r} is a directory; give a file name ending in .h5ad or .zarr."
        )
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"--out {str(path)!r} already exists; choose another file or pass --overwrite to "
            "replace it."
        )
    if path.suffix not in (".h5ad", ".zarr"):
        logger.warning("Writing an .h5ad file to %s, whose name does not end in .h5ad.", path)


def _read_h5ad(path: Path):
    import anndata

    if not path.is_file():
        raise FileNotFoundError(f"No such .h5ad file: {str(path)!r}.")
    try:
        return anndata.read_h5ad(path)
    except OSError as err:
        msg = f"Could not read {str(path)!r} as an .h5ad file: {_one_line(err)}"
        raise ValueError(msg) from err


def _check_creatable(path: Path) -> None:
    """Raise unless a directory can be created (or written) at ``path``, before any work."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"--out {str(path)!r}: {str(parent)!r} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--out {str(path)!r} cannot be created: {str(parent)!r} is not writable. Choose a "
            "directory you can write to."
        )


def _parse_labels(csv: str | None, repeated: Sequence[str] | None) -> list[str] | None:
    """Labels from ``--labels A,B`` and any number of ``--label NAME``; `None` for all."""
    labels: list[str] = []
    if csv is not None:
        labels += [part.strip() for part in csv.split(",") if part.strip()]
    labels += [name for name in (repeated or []) if name]
    if (csv is not None or repeated) and not labels:
        raise CLIError("--labels/--label name no cell type; omit them to generate every type.")
    return list(dict.fromkeys(labels)) or None  # unique, in the order given


def _device(text: str) -> int | str:
    """``auto`` or the index of one device."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a device index, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A share of the cells, in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _anchor_time(text: str) -> float:
    """A time in (0, 1] (the model checks it against its own ``t_min``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a time in (0, 1], got {text!r}")
    return value


_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: ``generate --noise`` -> ``BranchedDiffusion.generate(residual_noise=...)``
NOISE_OPTIONS = {"auto": "auto", "none": False, "gaussian": True, "nb": "nb"}


def _check_accelerator(name: str) -> None:
    """Fail early (before reading data) when the requested accelerator is not available."""
    import torch

    if name in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise CLIError(
            f"--accelerator {name}: no CUDA GPU is available here; use --accelerator cpu or auto."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise CLIError(
            "--accelerator mps: MPS is not available here; use --accelerator cpu or auto."
        )


def _is_multi_device(devices: int | str | list[int]) -> bool:
    if isinstance(devices, list):
        return len(devices) > 1
    return isinstance(devices, int) and (devices > 1 or devices == -1)


def _lightning_errors() -> tuple[type[BaseException], ...]:
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - lightning always ships it
        return ()
    return (MisconfigurationException,)


def _say(args: argparse.Namespace, text: str) -> None:
    """Print a result line, unless ``-q`` asked for nothing but errors."""
    if not args.quiet:
        print(text)


# ---------------------------------------------------------------------------- subcommands
def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ._demo import run_demo
    except ImportError as err:
        if getattr(err, "name", None) in {"scbranch._demo", f"{__package__}._demo"}:
            raise CLIError("the demo is not available in this installation of scbranch.") from err
        raise
    logger.info("Running the demo into %s%s.", args.out, " (fast mode)" if args.fast else "")
    result = run_demo(
        args.out,
        fast=args.fast,
        seed=args.seed,
        max_epochs=args.max_epochs,
        overwrite=args.overwrite,
    )
    _say(args, f"Demo finished; outputs in {args.out}")
    for key, value in (result or {}).items():
        if isinstance(value, str | os.PathLike | int | float):
            _say(args, f"  {key}: {value}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    data = Path(args.data)
    out = Path(args.out)
    # Check everything cheap before reading data and training.
    _check_output_dir(out, args.overwrite)
    _check_creatable(out)
    _check_accelerator(args.accelerator)
    validation = _validation_kwargs(args)

    import scvi

    from .model import BranchedDiffusion

    scvi.settings.seed = args.seed
    logger.info("Reading %s%s.", data, " (expression left on disk)" if args.backed else "")
    if args.backed or data.suffix == ".zarr":
        from .io import read_backed

        adata = read_backed(data)
    else:
        adata = _read_h5ad(data)
    model_kwargs = {"architecture": args.architecture, "objective": args.objective}
    if args.width is not None:
        model_kwargs["width"] = args.width
    if args.scvi:
        from .model import fit_scvi

        if args.target_sum is not None:
            raise CLIError("--target-sum applies to expression models; scVI reads the counts.")

        logger.info("Training scVI on the counts in %s.", args.counts_layer or ".X")
        vae = fit_scvi(
            adata,
            counts_layer=args.counts_layer,
            batch_key=args.batch_key,
            max_epochs=args.scvi_epochs,
            seed=args.seed,
            accelerator=args.accelerator,
            enable_progress_bar=not args.quiet,
        )
        model = BranchedDiffusion.from_scvi_model(
            vae, labels_key=args.labels, adata=adata, **model_kwargs
        )
    else:
        if args.batch_key is not None:
            raise CLIError("--batch-key applies to --scvi models only.")
        if args.target_sum is not None and args.rep is not None:
            raise CLIError("--target-sum normalises raw counts for expression models; drop --rep.")
        rep = args.rep
        if args.out_of_fold:
            rep = _out_of_fold_rep(adata, args)
        BranchedDiffusion.setup_anndata(
            adata,
            labels_key=args.labels,
            layer=args.layer,
            obsm_key=rep,
            counts_layer=args.counts_layer,
            target_sum=args.target_sum,
        )
        model = BranchedDiffusion(adata, **model_kwargs)
    logger.info("Training on %d cells of %d types.", adata.n_obs, len(model.classes))
    train_kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    train_kwargs.update(validation)
    if _is_multi_device(args.devices):
        # Each batch uses only some branch heads, so DDP must tolerate unused parameters.
        train_kwargs["strategy"] = "ddp_find_unused_parameters_true"
    try:
        model.train(
            max_epochs=args.max_epochs,
            accelerator=args.accelerator,
            devices=args.devices,
            enable_progress_bar=not args.quiet,
            **train_kwargs,
        )
    except _lightning_errors() as err:
        raise CLIError(f"--accelerator/--devices: {_one_line(err)}") from err
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return 0  # DDP: Lightning re-ran this command in every process; only rank 0 saves.
    model.save(str(out), overwrite=True, save_anndata=False)
    _say(args, f"Hierarchy of {len(model.classes)} cell types: {model.tree.to_newick()}")
    if "validation_loss" in model.history:
        curve = model.history["validation_loss"].iloc[:, 0].astype(float)
        _say(
            args,
            f"Validation loss (held-out cells' denoising error): first {curve.iloc[0]:.4f}, "
            f"lowest {curve.min():.4f} after epoch {int(curve.idxmin()) + 1}, last "
            f"{curve.iloc[-1]:.4f} after epoch {int(curve.index[-1]) + 1}",
        )
    _say(args, f"Saved model to {out}")
    return 0


def _validation_kwargs(args) -> dict:
    """``model.train`` options of --validation-size / --early-stopping."""
    if args.validation_size is None:
        if args.early_stopping:
            raise CLIError(
                "--early-stopping watches the error on held-out cells: add --validation-size "
                "(e.g. 0.1)."
            )
        return {}
    return {
        "train_size": 1.0 - args.validation_size,
        "check_val_every_n_epoch": 1,
        "early_stopping": args.early_stopping,
    }


def _out_of_fold_rep(adata, args: argparse.Namespace) -> str:
    """``--out-of-fold``: out-of-fold scores of the PCA in ``--rep``, in memory; their key."""
    from .tl import pca_out_of_fold

    if args.rep is None or args.scvi:
        raise CLIError("--out-of-fold applies to a PCA given with --rep (e.g. --rep X_pca).")
    if args.backed:
        raise CLIError("--out-of-fold refits the PCA on folds of the cells: drop --backed.")
    key = f"{args.rep}_oof"
    try:
        pca_out_of_fold(
            adata, obsm_key=args.rep, layer=args.layer, groupby=args.labels, key_added=key
        )
    except (KeyError, ValueError) as err:
        raise CLIError(f"--out-of-fold: {_one_line(err)}") from err
    logger.info("Learning out-of-fold scores of obsm[%r] (obsm[%r]).", args.rep, key)
    return key


def _cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_output_file(out, args.overwrite)
    labels = _parse_labels(args.labels, args.label)
    _check_accelerator(args.accelerator)

    from ._utils import resolve_seed
    from .model import BranchedDiffusion

    model_dir = Path(args.model_dir)
    logger.info("Loading the model in %s.", model_dir)
    device = "auto" if args.accelerator == "cpu" else args.device  # CPUs have no index
    try:
        model = BranchedDiffusion.load(str(model_dir), accelerator=args.accelerator, device=device)
    except _lightning_errors() as err:
        raise CLIError(f"--accelerator/--device: {_one_line(err)}") from err
    seed = resolve_seed(args.seed)  # drawn here to be reported (and recorded in the file)
    if args.anchors is not None:
        return _generate_anchored(model, args, labels, seed, out)
    # written block by block as the cells are made: memory does not grow with --n-cells, and
    # the file appears under its name only when complete (Ctrl-C or an error leave none)
    model.generate(
        args.n_cells,
        labels=labels,
        solver=args.solver,
        n_steps=args.n_steps,
        share=not args.no_share,
        seed=seed,
        counts=True if args.counts else None,
        residual_noise=NOISE_OPTIONS[args.noise],
        batch=args.batch,
        progress_bar=not args.quiet,
        out=out,
        overwrite=args.overwrite,
        block_size=args.block_size,
        layers=None if args.layers is None else [x.strip() for x in args.layers.split(",") if x],
    )
    n_types = len(set(labels)) if labels is not None else len(model.classes)
    _say(
        args,
        f"Wrote {args.n_cells * n_types} generated cells of {n_types} cell type(s) to {out} "
        f"(seed {seed})",
    )
    return 0


def _generate_anchored(model, args: argparse.Namespace, labels, seed: int, out: Path) -> int:
    """``generate --anchors``: new cells made from the real cells of an .h5ad file."""
    ignored = [
        flag
        for flag, given in (
            ("--no-share", args.no_share),
            ("--block-size", args.block_size is not None),
            ("--layers", args.layers is not None),
            ("--solver", args.solver != DEFAULT_SOLVER),
        )
        if given
    ]
    if ignored:
        raise CLIError(
            f"{', '.join(ignored)} do(es) not apply with --anchors: anchored cells follow the "
            "reverse SDE from their own anchors, in one block. Drop them."
        )
    anchors = _read_h5ad(Path(args.anchors))
    n_cells = args.n_cells if labels is None else dict.fromkeys(labels, args.n_cells)
    try:
        gen = model.generate_anchored(
            anchors, n_cells,
            anchor_time=args.anchor_time, n_steps=args.n_steps, seed=seed,
            counts=True if args.counts else None, residual_noise=NOISE_OPTIONS[args.noise],
            batch=args.batch, progress_bar=not args.quiet, out=out, overwrite=args.overwrite,
        )  # fmt: skip
    except (KeyError, ValueError) as err:
        raise CLIError(f"--anchors {args.anchors!r}: {_one_line(err)}") from err
    n_types = len(labels) if labels is not None else anchors.obs[model.labels_key].nunique()
    _say(
        args,
        f"Wrote {args.n_cells * n_types} cells of {n_types} cell type(s), anchored on the cells "
        f"of {args.anchors}, to {gen} (seed {seed})",
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if not args.trust_pickle:
        raise CLIError(
            f"{args.old_dir!r} would be unpickled, which runs any code it contains; pass "
            "--trust-pickle if you trust its source."
        )
    out = Path(args.out)
    _check_output_dir(out, args.overwrite)
    from .model import convert_legacy

    convert_legacy(args.old_dir, out, overwrite=args.overwrite)
    _say(args, f"Converted {args.old_dir} to {out} (tensors and plain data; no pickle)")
    return 0


# ---------------------------------------------------------------------------- parser
def _epilog(*lines: str) -> str:
    head = "example:" if len(lines) == 1 else "examples:"
    return head + "\n" + "\n".join(f"  {line}" if line else "" for line in lines)


def _common(parser: argparse.ArgumentParser, bars: bool = True) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="Show only warnings and errors: no progress messages"
        + (" and no progress bars." if bars else "."),
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="On an error, show the full Python traceback instead of a one-line message.",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``scbranch`` command.

    Returns
    -------
    The parser, with the subcommands ``demo``, ``fit`` and ``generate``.

    Examples
    --------
    >>> args = build_parser().parse_args(["generate", "m/", "--n-cells", "10", "--out", "g.h5ad"])
    >>> args.n_cells, args.solver
    (10, 'em')
    """
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        description=(
            "Hierarchically branched diffusion models that generate single cells of any cell\n"
            "type. "
            "Fit a model to an .h5ad file, then generate new cells of the types it knows."
        ),
        epilog=_epilog(
            f"{PROG} demo --out demo_out --fast",
            f"{PROG} fit pbmc.h5ad --labels cell_type --rep X_pca --out pbmc_model",
            f"{PROG} generate pbmc_model --n-cells 500 --out generated.h5ad",
            "",
            f"Run '{PROG} COMMAND --help' for the options of a command.",
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="Print the version of scbranch and exit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="Run the whole pipeline on the shipped PBMC data.",
        description=(
            "Run the whole pipeline on the shipped PBMC data: discover the cell-type hierarchy,\n"
            "train, generate every cell type, evaluate and plot. Writes DIR/generated.h5ad,\n"
            "DIR/report.csv, PNG figures and the trained model."
        ),
        epilog=_epilog(f"{PROG} demo --out demo_out --fast --seed 0"),
    )
    demo.add_argument(
        "--out", required=True, metavar="DIR", help="Directory to write the results into."
    )
    demo.add_argument(
        "--fast",
        action="store_true",
        help="Fewer cells and epochs: a quick check that everything runs (results are rough).",
    )
    demo.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="Random seed of training and generation (default: %(default)s).",
    )
    demo.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Training epochs (default: the package's default budget; 3 with --fast).",
    )
    demo.add_argument(
        "--overwrite", action="store_true", help="Replace the results already in DIR."
    )
    _common(demo, bars=False)
    demo.set_defaults(handler=_cmd_demo)

    # ------------------------------------------------------------------ fit
    fit = sub.add_parser(
        "fit",
        formatter_class=fmt,
        help="Train a model on an .h5ad file and save it.",
        description=textwrap.dedent(
            """\
            Train a branched diffusion model on the cells of an .h5ad file and save it.
            The cell-type hierarchy is reused from uns['scbranch_hierarchy'] when it was computed
            on the same labels and representation (scbranch.tl.branch_hierarchy), otherwise it is
            discovered. The model learns a latent representation (--rep, e.g. a PCA) or
            log-normalised expression (--layer, or .X when neither is given). The input file is
            never modified."""
        ),
        epilog=_epilog(
            f"{PROG} fit pbmc.h5ad --labels cell_type --rep X_pca --out pbmc_model "
            "--max-epochs 300",
            f"{PROG} fit pbmc.h5ad --labels cell_type --layer lognorm --out expr_model "
            "--accelerator gpu --devices 1",
            f"{PROG} fit atlas.h5ad --labels cell_type --backed --target-sum 1e4 "
            "--out atlas_model --accelerator gpu --devices -1",
        ),
    )
    fit.add_argument("data", metavar="DATA.h5ad", help="AnnData file with the cells to learn.")
    fit.add_argument(
        "--labels",
        required=True,
        metavar="KEY",
        help="Column of .obs with the cell types to learn (e.g. cell_type).",
    )
    rep = fit.add_mutually_exclusive_group()
    rep.add_argument(
        "--rep",
        metavar="KEY",
        default=None,
        help="Key of .obsm with the latent representation to learn (e.g. X_pca). Generated cells "
        "get expression in .X too when the PCA loadings are in .varm['PCs'].",
    )
    rep.add_argument(
        "--layer",
        metavar="L",
        default=None,
        help="Layer with log-normalised expression to learn instead of a representation "
        "(default without --rep: .X).",
    )
    rep.add_argument(
        "--scvi",
        action="store_true",
        help="Train an scVI model on the counts (--counts-layer) and learn its latent space; "
        "generated cells then get scVI's normalised expression and negative-binomial counts.",
    )
    fit.add_argument(
        "--counts-layer",
        metavar="L",
        default=None,
        help="Layer with the raw counts: what --scvi trains on (default there: .X), or, with "
        "--rep/--layer, what lets 'generate --counts' return counts.",
    )
    fit.add_argument(
        "--out-of-fold",
        action="store_true",
        help="With --rep of a PCA (loadings in .varm['PCs']): learn PC scores that spread like "
        "new cells' (scbranch.tl.pca_out_of_fold, stratified by --labels) instead of the "
        "in-sample ones, which spread more and make generated cells easier to tell from real "
        "ones (docs/benchmarks/out_of_fold.md). The input file is not changed.",
    )
    fit.add_argument(
        "--target-sum",
        type=float,
        default=None,
        metavar="T",
        help="Expression models on RAW COUNTS (an atlas's .X): learn log1p(counts / total * T), "
        "normalised a block of cells at a time (e.g. 1e4); counts for 'generate --counts' "
        "then come from the cells' totals.",
    )
    fit.add_argument(
        "--backed",
        action="store_true",
        help="Leave the expression matrix on disk and read it in blocks of cells (atlases "
        "larger than memory; always on for a .zarr store). Only obs, var, obsm and uns are "
        "loaded.",
    )
    fit.add_argument(
        "--batch-key",
        metavar="KEY",
        default=None,
        help="With --scvi: column of .obs with batches for scVI.",
    )
    fit.add_argument(
        "--scvi-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="With --scvi: scVI training epochs (default: scvi-tools' heuristic).",
    )
    fit.add_argument(
        "--out",
        required=True,
        metavar="MODEL_DIR",
        help="Directory to save the model to; must not exist or be empty unless --overwrite.",
    )
    fit.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Passes over the cells (default: about 100, within 500-16,000 optimiser steps).",
    )
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Cells per optimiser step (default: the model's, 64; larger batches gave "
        "under-dispersed cells at the same number of steps, docs/method.md).",
    )
    fit.add_argument(
        "--validation-size",
        type=_fraction,
        default=None,
        metavar="F",
        help="Hold out this share of the cells and report their denoising error every epoch "
        "(the model's history 'validation_loss'; docs/evaluation.md). Off by default: a "
        "generator should learn from every cell.",
    )
    fit.add_argument(
        "--early-stopping",
        action="store_true",
        help="With --validation-size: stop when the held-out error stops falling "
        "(scvi-tools' early stopping, patience 45 epochs) and keep the weights of its lowest "
        "point.",
    )
    fit.add_argument(
        "--accelerator",
        choices=_ACCELERATORS,
        default="auto",
        help="Hardware to train on; auto picks a GPU when there is one (default: %(default)s).",
    )
    fit.add_argument(
        "--devices",
        type=_devices,
        default="auto",
        metavar="D",
        help="Devices to train on: auto, a number (-1 for all) or indices such as 0,1 "
        "(default: %(default)s).",
    )
    fit.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="Random seed of initialisation and training (default: %(default)s).",
    )
    fit.add_argument(
        "--architecture",
        choices=("conditioned", "branched"),
        default="conditioned",
        help="'conditioned' (default): one network conditioned on the branch, whose size does "
        "not grow with the number of types; 'branched': a shared trunk and one head per "
        "branch (the same quality at 10x the parameters).",
    )
    fit.add_argument(
        "--objective",
        choices=("eps", "flow"),
        default="eps",
        help="'eps' (default): the network predicts the noise; 'flow': flow matching's "
        "velocity of the linear interpolant, on the same process (docs/benchmarks/"
        "flow_matching.md).",
    )
    fit.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Hidden width of the score network (default: the model's, 256).",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="Save into MODEL_DIR even if it is not empty (replaces the model there).",
    )
    _common(fit)
    fit.set_defaults(handler=_cmd_fit)

    # ------------------------------------------------------------------ generate
    gen = sub.add_parser(
        "generate",
        formatter_class=fmt,
        help="Generate new cells with a saved model and write them to an .h5ad file.",
        description=textwrap.dedent(
            """\
            Generate new cells of the cell types a saved model knows and write them to a new
            .h5ad file: cell types in .obs[<labels key>], the latent representation in .obsm
            (latent models), expression in .X when the model can decode it, and the settings
            (including the seed) in .uns['scbranch']."""
        ),
        epilog=_epilog(
            f"{PROG} generate pbmc_model --n-cells 500 --out generated.h5ad --seed 0",
            f"{PROG} generate pbmc_model --n-cells 1000 --labels 'CD19+ B,CD14+ Monocyte' "
            "--solver dpm2m --n-steps 30 --out b_and_mono.h5ad",
        ),
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="Directory of a model saved by 'fit'.")
    gen.add_argument(
        "--n-cells",
        type=_positive_int,
        required=True,
        metavar="N",
        help="Cells to generate of each cell type.",
    )
    gen.add_argument(
        "--labels",
        default=None,
        metavar="A,B",
        help="Comma-separated cell types to generate (default: every type of the model).",
    )
    gen.add_argument(
        "--label",
        action="append",
        default=None,
        metavar="NAME",
        help="A cell type to generate; repeat for several. Use this for names that contain commas.",
    )
    gen.add_argument(
        "--solver",
        choices=solver_names("down"),
        default=DEFAULT_SOLVER,
        help="Sampler: "
        + "; ".join(f"{name}: {SOLVERS[name].description}" for name in solver_names("down"))
        + ".",
    )
    gen.add_argument(
        "--n-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"Steps from pure noise to cells (default: {DEFAULT_N_STEPS}, more for trees with "
        "more branch points than that).",
    )
    gen.add_argument(
        "--anchors",
        default=None,
        metavar="DATA.h5ad",
        help="Make each new cell from a real cell of its type in this file (anchored generation: "
        "the cell is noised to --anchor-time and brought back down its type's reverse SDE). The "
        "file holds cells in the model's representation, labelled like the training cells; "
        "without --labels every type it holds gets --n-cells cells.",
    )
    gen.add_argument(
        "--anchor-time",
        type=_anchor_time,
        default=DEFAULT_ANCHOR_TIME,
        metavar="T",
        help="With --anchors: how far up the process the anchors are noised, in (0, 1]; lower "
        "keeps more of each anchor (default: %(default)s).",
    )
    gen.add_argument(
        "--seed",
        type=_seed,
        default=None,
        metavar="N",
        help="Random seed (default: a random one, printed and recorded in .uns['scbranch']).",
    )
    gen.add_argument(
        "--no-share",
        action="store_true",
        help="Give every cell its own reverse path. By default cells of related types share the "
        "path above their branch point, which needs fewer network calls.",
    )
    gen.add_argument(
        "--counts",
        action="store_true",
        help="Also write counts to .layers['counts'] (models fitted with --counts-layer; scVI "
        "models always do).",
    )
    gen.add_argument(
        "--noise",
        choices=sorted(NOISE_OPTIONS),
        default="auto",
        help="PCA models: what decoded cells carry beyond their PCA profile: none, per-gene "
        "Gaussian noise (gaussian), or negative binomial counts around it with .X their "
        "log-normalisation (nb; models fitted with --counts-layer). Default auto: nb for "
        "PCA models fitted with --counts-layer, else none.",
    )
    gen.add_argument(
        "--batch",
        default=None,
        metavar="NAME",
        help="scVI models with batches: the batch to decode into (default: the most common).",
    )
    gen.add_argument(
        "--out",
        required=True,
        metavar="OUT.h5ad|OUT.zarr",
        help="File (.h5ad) or zarr store (.zarr) to write the generated cells to. Cells are "
        "written block by block as they are made (memory does not grow with --n-cells); the "
        "output appears under its name only once complete.",
    )
    gen.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Cells per block (default: what fits in about 256 MB, from the model). The cells "
        "depend on it: give the same value to reproduce a run.",
    )
    gen.add_argument(
        "--layers",
        default=None,
        metavar="A,B",
        help="Layers to write, comma-separated (default: every layer the model makes), e.g. "
        "'counts' to leave out scVI's dense normalised expression (8 kB a cell at 2,000 genes).",
    )
    gen.add_argument(
        "--accelerator",
        choices=_ACCELERATORS,
        default="auto",
        help="Hardware to generate on; auto picks a GPU when there is one (default: %(default)s).",
    )
    gen.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="D",
        help="Device index on that accelerator, or auto (default: %(default)s).",
    )
    gen.add_argument("--overwrite", action="store_true", help="Replace OUT if it already exists.")
    _common(gen)
    gen.set_defaults(handler=_cmd_generate)

    # ------------------------------------------------------------------ convert
    conv = sub.add_parser(
        "convert",
        formatter_class=fmt,
        help="Rewrite a model saved by scbranch < 0.2 (a pickle) as plain data, once.",
        description=textwrap.dedent(
            """\
            Models saved by scbranch < 0.2 are pickles: reading one runs whatever code it
            contains. If you trust where OLD_DIR came from, this reads it once and writes it to
            NEW_DIR as tensors and plain data, which load without running any code. OLD_DIR is
            left as it is."""
        ),
        epilog=_epilog(f"{PROG} convert old_model --out new_model --trust-pickle"),
    )
    conv.add_argument("old_dir", metavar="OLD_DIR", help="Directory of the old model.")
    conv.add_argument("--out", required=True, metavar="NEW_DIR", help="Directory to write.")
    conv.add_argument(
        "--trust-pickle",
        action="store_true",
        help="Confirm that OLD_DIR comes from a source you trust (required: unpickling runs code).",
    )
    conv.add_argument("--overwrite", action="store_true", help="Replace NEW_DIR if it exists.")
    _common(conv, bars=False)
    conv.set_defaults(handler=_cmd_convert)
    return parser


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the ``scbranch`` command line.

    Errors in the user's input (a missing file or key, an unknown cell type, an output that
    already exists, ...) are reported as one line ``scbranch: error: <message>`` on standard
    error with exit status 2, not as a traceback (``--traceback`` shows one).

    Parameters
    ----------
    argv
        Arguments without the program name; `None` reads ``sys.argv[1:]``.

    Returns
    -------
    The exit status: 0 on success, 2 for bad input or any other error (one line; ``--traceback``
    shows the traceback), 130 when interrupted with Ctrl-C. ``--help``, ``--version`` and usage
    errors raise :class:`SystemExit` (status 0 and 2) as usual for :mod:`argparse`.

    Examples
    --------
    Train on the cell types in ``obs['cell_type']`` of a PCA, then generate 100 cells of each type:

    >>> from scbranch.cli import main
    >>> main(["fit", "pbmc.h5ad", "--labels", "cell_type", "--rep", "X_pca",
    ...       "--out", "pbmc_model"])  # doctest: +SKIP
    0
    >>> main(["generate", "pbmc_model", "--n-cells", "100", "--out", "gen.h5ad"])  # doctest: +SKIP
    0

    From a shell: ``scbranch fit pbmc.h5ad --labels cell_type --rep X_pca --out pbmc_model``.
    """
    args = build_parser().parse_args(argv)
    loggers = [
        logging.getLogger(name)
        for name in (__package__ or "scbranch", "scvi", "lightning.pytorch", "lightning.fabric")
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        if args.quiet:  # nothing but errors
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        try:
            return args.handler(args)
        except (CLIError, *_USER_ERRORS) as err:
            if args.traceback:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - anything else: one line, not a traceback
            if args.traceback:
                raise
            print(
                f"{PROG}: error: {type(err).__name__}: {_one_line(err)} (run again with "
                "--traceback for the details, and please report it)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
