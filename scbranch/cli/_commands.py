"""What each subcommand does with its parsed arguments."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from ..module._solvers import (
    DEFAULT_ANCHOR_TIME,
    DEFAULT_SOLVER,
)
from ._checks import (
    NOISE_OPTIONS,
    CLIError,
    _check_accelerator,
    _check_creatable,
    _check_output_dir,
    _check_output_file,
    _is_multi_device,
    _lightning_errors,
    _one_line,
    _parse_labels,
    _read_h5ad,
    _say,
)

logger = logging.getLogger(__name__)
#: share of each type's cells in every resample of ``hierarchy --support`` (branch_stability's)
SUPPORT_FRACTION = 0.8


# ---------------------------------------------------------------------------- subcommands
def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .._demo import run_demo
    except ImportError as err:
        if getattr(err, "name", None) == "scbranch._demo":
            raise CLIError("the demo is not available in this installation of scbranch.") from err
        raise
    logger.info("Running the demo into %s%s.", args.out, " (fast mode)" if args.fast else "")
    result = run_demo(
        args.out,
        fast=args.fast,
        seed=args.seed,
        max_epochs=args.max_epochs,
        overwrite=args.overwrite,
        progress_bar=not args.quiet,
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

    from ..model import BranchedDiffusion

    scvi.settings.seed = args.seed
    adata = _read_cells(data, args.backed)
    model_kwargs = {"architecture": args.architecture, "objective": args.objective}
    if args.newick is not None:  # the user's topology; branch times from these cells
        model_kwargs["hierarchy"] = args.newick
    if args.width is not None:
        model_kwargs["width"] = args.width
    if args.scvi:
        from ..model import fit_scvi

        if args.target_sum is not None:
            raise CLIError("--target-sum applies to expression models; scVI reads the counts.")
        if args.layer is not None:
            raise CLIError(
                "--layer applies to PCA and expression models; --scvi trains on the counts "
                "(--counts-layer)."
            )

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
        for flag, value in (("--batch-key", args.batch_key), ("--scvi-epochs", args.scvi_epochs)):
            if value is not None:
                raise CLIError(f"{flag} applies to --scvi models only.")
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
    # the file the cells came from, read into memory here: `generate --out` will not replace it
    model.data_source_ = str(data.resolve())
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


def _read_cells(data: Path, backed: bool):
    """The cells of DATA, in memory or with the expression left on disk (--backed, .zarr)."""
    backed = backed or data.suffix == ".zarr"
    logger.info("Reading %s%s.", data, " (expression left on disk)" if backed else "")
    if not backed:
        return _read_h5ad(data)
    from ..io import read_backed

    return read_backed(data)


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
    from ..tl import pca_out_of_fold

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
    if args.anchor_time is not None and args.anchors is None:
        raise CLIError("--anchor-time applies to anchored generation: add --anchors DATA.h5ad.")
    out = Path(args.out)
    _check_output_file(out, args.overwrite, {"--anchors": args.anchors})
    labels = _parse_labels(args.labels, args.label)
    _check_accelerator(args.accelerator, args.device)

    from .._utils import resolve_seed
    from ..model import BranchedDiffusion

    model_dir = Path(args.model_dir)
    logger.info("Loading the model in %s.", model_dir)
    device = "auto" if args.accelerator == "cpu" else args.device  # CPUs have no index
    try:
        model = BranchedDiffusion.load(str(model_dir), accelerator=args.accelerator, device=device)
    except _lightning_errors() as err:
        raise CLIError(f"--accelerator/--device: {_one_line(err)}") from err
    _check_split_labels(model, labels, args.labels)
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
        calibrate_spread=args.calibrate_spread,
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


def _check_split_labels(model, labels: list[str] | None, csv: str | None) -> None:
    """Name ``--label`` when ``--labels`` split a type's own comma into unknown names."""
    if labels is None or not csv or "," not in csv:
        return
    known = set(model.classes) | set(model.tree.node_names)
    unknown = [name for name in labels if name not in known]
    if unknown:
        raise CLIError(
            f"Unknown cell type(s) {unknown}: --labels splits at commas; give a type whose name "
            "holds a comma with --label (one per type, e.g. --label 'B cell, naive'). The "
            f"model knows {list(model.classes)}."
        )


def _generate_anchored(model, args: argparse.Namespace, labels, seed: int, out: Path) -> int:
    """``generate --anchors``: new cells made from the real cells of an .h5ad file."""
    ignored = [
        flag
        for flag, given in (
            ("--no-share", args.no_share),
            ("--block-size", args.block_size is not None),
            ("--layers", args.layers is not None),
            ("--solver", args.solver != DEFAULT_SOLVER),
            ("--calibrate-spread", args.calibrate_spread),
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
            anchor_time=args.anchor_time or DEFAULT_ANCHOR_TIME, n_steps=args.n_steps, seed=seed,
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
    from ..model._persistence import check_convertible

    check_convertible(args.old_dir)  # before asking to trust a pickle it does not hold
    if not args.trust_pickle:
        raise CLIError(
            f"{args.old_dir!r} would be unpickled, which runs any code it contains; pass "
            "--trust-pickle if you trust its source."
        )
    out = Path(args.out)
    _check_output_dir(out, args.overwrite)
    from ..model import convert_legacy

    convert_legacy(args.old_dir, out, overwrite=args.overwrite)
    _say(args, f"Converted {args.old_dir} to {out} (tensors and plain data; no pickle)")
    return 0


def _cmd_hierarchy(args: argparse.Namespace) -> int:
    from .._keys import Key
    from ..io import copy_with_uns, is_zarr_path

    data = Path(args.data)
    outputs = {"--out": args.out, "--table": args.table, "--plot": args.plot}
    outputs = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    kinds = {"--out": "a file name ending in .h5ad or .zarr", "--table": "a .csv file name"}
    # Check everything cheap before reading data and bootstrapping.
    for flag, path in outputs.items():
        _check_output_file(
            path,
            args.overwrite,
            {"DATA.h5ad": args.data},
            option=flag,
            kind=kinds.get(flag, "an image file name (.png, .pdf, .svg)"),
        )
    if args.support is not None and args.support < 2:
        raise CLIError(f"--support needs 2 or more resamples to read a spread, not {args.support}.")
    backed = args.backed or is_zarr_path(data)
    if backed and "--out" in outputs and is_zarr_path(outputs["--out"]) != is_zarr_path(data):
        # the cells left on disk are copied as they are, not converted
        suffix = ".zarr" if is_zarr_path(data) else ".h5ad"
        raise CLIError(
            f"--out copies {str(data)!r} as it is on disk, with the tree added: name it with "
            f"{suffix}, or drop --backed to read the cells and write them in either format."
        )
    resolved = [path.resolve() for path in outputs.values()]
    if len(set(resolved)) < len(resolved):
        raise CLIError(f"{', '.join(outputs)} name the same file; give each its own.")
    if "--plot" in outputs:  # matplotlib's refusal came after discovery and every resample
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if outputs["--plot"].suffix.lstrip(".").lower() not in formats:
            raise CLIError(
                f"--plot {str(outputs['--plot'])!r}: matplotlib writes no "
                f"{outputs['--plot'].suffix or 'extensionless'!r} file; end the name with one "
                f"of {', '.join('.' + f for f in sorted(formats))}."
            )

    from ..tl import branch_hierarchy, branch_stability, read_hierarchy
    from ..tl._branch_stability import branch_points

    adata = _read_cells(data, backed)
    logger.info("Learning the tree of obs[%r] in %s.", args.labels, args.rep or args.layer or ".X")
    branch_hierarchy(
        adata,
        args.labels,
        use_rep=args.rep,
        layer=args.layer,
        target_sum=args.target_sum,
        hierarchy=args.newick,
        curves=args.curves,
        seed=args.seed,
    )
    tree, _ = read_hierarchy(adata)
    # the tree and its support are this command's result, printed under -q too (with -q it
    # printed nothing, though without --out it writes nothing else)
    print(f"Hierarchy of {len(tree.classes)} cell types: {tree.to_newick()}")
    if args.support is not None:
        table = branch_stability(
            adata,
            n_bootstrap=args.support,
            fraction=SUPPORT_FRACTION,
            seed=args.seed,
            progress_bar=not args.quiet,
        )
        print(
            f"Support over {args.support} resamples of {SUPPORT_FRACTION:.0%} of each type's cells:"
        )
        for row in table.itertuples():
            interval = "never recurs" if np.isnan(row.t_lo) else f"{row.t_lo:.3f}-{row.t_hi:.3f}"
            print(f"  {row.support:4.0%}  t {row.t:.3f} ({interval})  {row.classes}")
    else:
        table = branch_points(tree)
    for path in outputs.values():  # as generate --out does: a new folder is made, not refused
        path.parent.mkdir(parents=True, exist_ok=True)
    if "--table" in outputs:
        table.to_csv(outputs["--table"], index=False)
        _say(args, f"Wrote the branch points to {outputs['--table']}")
    if "--plot" in outputs:
        import matplotlib.pyplot as plt

        from ..pl import branch_tree

        fig = branch_tree(adata, show=False, return_fig=True)
        try:
            fig.savefig(outputs["--plot"], bbox_inches="tight")
        finally:
            plt.close(fig)
        _say(args, f"Drew the tree into {outputs['--plot']}")
    if "--out" in outputs:
        out = outputs["--out"]
        if backed:  # a copy of the file or store with the tree in uns; .X is never read
            key = Key.uns.HIERARCHY
            copy_with_uns(data, out, {key: adata.uns[key]}, overwrite=args.overwrite)
        elif is_zarr_path(out):
            adata.write_zarr(out)
        else:
            adata.write_h5ad(out)
        _say(args, f"Wrote the cells with the tree to {out}")
    return 0
