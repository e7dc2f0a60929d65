"""The argument parser of every subcommand (rendered by docs/cli.md)."""

from __future__ import annotations

import argparse
import textwrap

from ..module._solvers import (
    ALIASES,
    DEFAULT_ANCHOR_TIME,
    DEFAULT_N_STEPS,
    DEFAULT_SOLVER,
    SOLVERS,
    solver_names,
)
from ._checks import (
    _ACCELERATORS,
    NOISE_OPTIONS,
    PROG,
    _anchor_time,
    _device,
    _devices,
    _fraction,
    _positive_int,
    _seed,
)
from ._commands import _cmd_convert, _cmd_demo, _cmd_fit, _cmd_generate, _cmd_hierarchy


# ---------------------------------------------------------------------------- parser
def _epilog(*lines: str) -> str:
    head = "example:" if len(lines) == 1 else "examples:"
    return head + "\n" + "\n".join(f"  {line}" if line else "" for line in lines)


def _common(parser: argparse.ArgumentParser, bars: bool = True, result: str = "") -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="Show only warnings and errors: no progress messages"
        + (" and no progress bars." if bars else ".")
        + (f" {result}" if result else ""),
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
    The parser, with the subcommands ``demo``, ``hierarchy``, ``fit``, ``generate`` and
    ``convert``.

    Examples
    --------
    >>> args = build_parser().parse_args(["generate", "m/", "--n-cells", "10", "--out", "g.h5ad"])
    >>> args.n_cells, args.solver
    (10, 'em')
    """
    from .. import __version__

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
            f"{PROG} hierarchy pbmc.h5ad --labels cell_type --rep X_pca --support 50",
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
            "train, generate every cell type, evaluate and plot. Writes into DIR: generated.h5ad,\n"
            "report.csv and evaluation.csv (the evaluation), transmutation.h5ad, summary.json,\n"
            "PNG figures and the trained model (model/)."
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

    # ------------------------------------------------------------------ hierarchy
    hier = sub.add_parser(
        "hierarchy",
        formatter_class=fmt,
        help="Learn the cell-type tree of an .h5ad file and how often each branch point recurs.",
        description=textwrap.dedent(
            """\
            Learn the branch tree over the cell types of an .h5ad file: the diffusion time at
            which types become indistinguishable under noise (scbranch.tl.branch_hierarchy).
            Prints the tree in Newick format. --support N learns it again on N resamples of 80 %
            of each type's cells (scbranch.tl.branch_stability) and prints how often each branch
            point recurs: clades resting on types of 40 cells or fewer often do not. --out
            writes the cells with the tree in uns['scbranch_hierarchy'], which 'scbranch fit'
            reuses when given the same --labels and --rep/--layer. The input file is never
            modified."""
        ),
        epilog=_epilog(
            f"{PROG} hierarchy pbmc.h5ad --labels cell_type --rep X_pca --support 50",
            f"{PROG} hierarchy pbmc.h5ad --labels cell_type --rep X_pca --support 50 "
            "--out pbmc_tree.h5ad --table support.csv --plot tree.png",
            f"{PROG} hierarchy pbmc3k.h5ad --labels cell_type --target-sum 1e4 --newick "
            "'((B,(CD4 T,CD8 T,NK)),(CD14 Mono,FCGR3A Mono,DC),Megakaryocyte);'",
        ),
    )
    hier.add_argument(
        "data", metavar="DATA.h5ad", help="AnnData file (or .zarr store) with the cells."
    )
    hier.add_argument(
        "--labels",
        required=True,
        metavar="KEY",
        help="Column of .obs with the cell types (e.g. cell_type).",
    )
    hier_rep = hier.add_mutually_exclusive_group()
    hier_rep.add_argument(
        "--rep",
        metavar="KEY",
        default=None,
        help="Key of .obsm with the representation to learn the tree in (e.g. X_pca); what "
        "'fit --rep' learns.",
    )
    hier_rep.add_argument(
        "--layer",
        metavar="L",
        default=None,
        help="Layer with log-normalised expression to learn the tree in (default without "
        "--rep: .X).",
    )
    hier.add_argument(
        "--target-sum",
        type=float,
        default=None,
        metavar="T",
        help="When the expression holds RAW COUNTS: learn in log1p(counts / total * T) (e.g. 1e4).",
    )
    hier.add_argument(
        "--backed",
        action="store_true",
        help="Leave the expression matrix on disk (atlases; always on for a .zarr store): "
        "discovery reads at most a few hundred cells of each type. --out is then a copy of "
        "DATA as it is on disk with the tree added.",
    )
    hier.add_argument(
        "--newick",
        metavar="TREE",
        default=None,
        help="Your own topology over the cell types, e.g. '((B,T),Mono);': only the branch "
        "times come from the data. Every type of --labels must appear once.",
    )
    hier.add_argument(
        "--curves",
        choices=("sampled", "expected"),
        default="sampled",
        help="The tree's similarity curves: 'sampled' (default; the paper's): curves of noised "
        "cells; 'expected': their noiseless limit, deterministic, which found the true tree of "
        "simulated data far more often (docs/method.md). --support's resamples always draw "
        "noise, which keeps wrong clades' support low.",
    )
    hier.add_argument(
        "--support",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Learn the tree again on N resamples and report each branch point's support (the "
        "share of resamples in which it recurs) and the spread of its time; 50 is usual.",
    )
    hier.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="Random seed of the forward noise and the resamples (default: %(default)s).",
    )
    hier.add_argument(
        "--out",
        metavar="OUT.h5ad",
        default=None,
        help="Write the cells with the tree (and the support) to this new .h5ad file or .zarr "
        "store. With --backed (and for a .zarr store) it is a copy of DATA as it is on disk, "
        "the expression never read, with the tree added, so use DATA's format.",
    )
    hier.add_argument(
        "--table",
        metavar="CSV",
        default=None,
        help="Write the branch points (classes, branch time and, with --support, support and "
        "interval) to this CSV file.",
    )
    hier.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="Draw the tree (scbranch.pl.branch_tree, with the supports) into this image file "
        "(.png, .pdf, .svg).",
    )
    hier.add_argument(
        "--overwrite", action="store_true", help="Replace --out, --table or --plot files."
    )
    _common(hier, result="The tree (and its support) is printed all the same: it is the result.")
    hier.set_defaults(handler=_cmd_hierarchy)

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
        "--scvi",
        action="store_true",
        help="Train an scVI model on the counts (--counts-layer) and learn its latent space; "
        "generated cells then get scVI's normalised expression and negative-binomial counts.",
    )
    fit.add_argument(
        "--layer",
        metavar="L",
        default=None,
        help="Layer with log-normalised expression (default: .X): what the model learns without "
        "--rep, or, with --rep of a PCA, the expression the PCA was computed on, which generated "
        "cells are decoded into (e.g. when .X holds counts).",
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
        "--newick",
        metavar="TREE",
        default=None,
        help="Your own topology over the cell types (e.g. '((B,T),Mono);', or the tree that "
        "'scbranch hierarchy' printed): only the branch times come from the data. Default: the "
        "tree stored by 'scbranch hierarchy --out', else one learned from the cells.",
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
        help="With --scvi: scVI training epochs (default: scvi-tools' heuristic, but 800 on "
        "up to 750 cells and more than 400 below 1,500).",
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
        help="Passes over the cells (default: about 100, within 1,000-16,000 optimiser steps).",
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
        choices=solver_names("down") + list(ALIASES),  # the names generate(solver=) takes
        default=DEFAULT_SOLVER,
        help="Sampler: "
        + "; ".join(f"{name}: {SOLVERS[name].description}" for name in solver_names("down"))
        + "; "
        + ", ".join(f"{alias}: {name}" for alias, name in ALIASES.items())
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
        default=None,  # None: not given (refused without --anchors), else DEFAULT_ANCHOR_TIME
        metavar="T",
        help="With --anchors: how far up the process the anchors are noised, in (0, 1]; lower "
        f"keeps more of each anchor (default: {DEFAULT_ANCHOR_TIME}).",
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
        "--calibrate-spread",
        action="store_true",
        help="Give each type's cells the spread of its training cells around the model's centre "
        "of the type, per latent dimension (a network trained on a few dozen cells of a type "
        "makes them wider; docs/method.md). Off by default.",
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
