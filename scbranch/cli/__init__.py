"""Command line of scbranch: ``demo``, ``hierarchy``, ``fit``, ``generate``, ``convert``.

One job per file: ``_checks.py`` (argument types, input checks, exit statuses),
``_commands.py`` (what each subcommand does), ``_parser.py`` (the parser, rendered by
docs/cli.md); :func:`main` runs a command and turns bad input into one line and exit status 2
(other failures: exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from ..tl._branch_hierarchy import STABILITY_HINT
from ._checks import (
    _USER_ERRORS,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CLIError,
    _one_line,
)
from ._parser import build_parser

__all__ = ["CLIError", "build_parser", "main"]


# ---------------------------------------------------------------------------- entry point
#: Python argument spellings in scbranch's messages and the flags that set them here
_FLAGS = {
    "`target_sum=1e4`": "`--target-sum 1e4`",
    "`target_sum`": "`--target-sum`",
    "`layer=`": "`--layer`",
    "`counts_layer=`": "`--counts-layer`",
    "`obsm_key=`": "`--rep`",
    # a key that is not in the file: "labels_key='celltype' is not a column of adata.obs"
    "labels_key='": "--labels '",
    "groupby='": "--labels '",
    "use_rep='": "--rep '",
    "obsm_key='": "--rep '",
    "`layer='counts'`": "`--layer counts`",
    "residual_noise='nb'": "--noise nb",
    "`setup_anndata(..., counts_layer='counts')`": "`scbranch fit ... --counts-layer counts`",
    "`batch` applies": "--batch applies",
    "layers=[": "--layers [",
    "target_sum must": "--target-sum must",
    # the output appearing while cells are generated is caught by the writer, in Python terms
    "overwrite=True": "--overwrite",
    # discovery's few-cells warning (scbranch fit): the command that reads a tree's support
    STABILITY_HINT: "`scbranch hierarchy DATA.h5ad --labels KEY --support 50` (--plot draws it)",
}


def _in_flags(message: str) -> str:
    """``message`` with the Python arguments it names written as this command's flags."""
    for argument, flag in _FLAGS.items():
        message = message.replace(argument, flag)
    return message


def _one_line_warning(quiet: bool):
    """``warnings.showwarning`` for the command line.

    scbranch's warnings print as one line each (``scbranch: warning: ...``); other packages'
    as Python shows them, or not at all under ``-q``.
    """
    package = str(Path(__file__).resolve().parents[1])
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            print(f"{PROG}: warning: {_in_flags(_one_line(message))}", file=sys.stderr)
        elif not quiet:
            default(message, category, filename, lineno, file, line)

    return show


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
    The exit status: 0 on success, 2 for bad input, 1 for any other failure (both one line;
    ``--traceback`` shows the traceback), 130 when interrupted with Ctrl-C. ``--help``,
    ``--version`` and usage errors raise :class:`SystemExit` (status 0 and 2) as usual for
    :mod:`argparse`.

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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's top-level error printed the top-level usage, not the command's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    loggers = [
        logging.getLogger(name)
        for name in ("scbranch", "scvi", "lightning.pytorch", "lightning.fabric")
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():  # restores the filters and showwarning on the way out
        warnings.showwarning = _one_line_warning(quiet=args.quiet)
        if args.quiet:  # warnings (scbranch's) and errors: no progress, no library chatter
            for lg in loggers:
                lg.setLevel(logging.WARNING if lg.name == "scbranch" else logging.ERROR)
        try:
            return args.handler(args)
        except (CLIError, *_USER_ERRORS) as err:
            if args.traceback:
                raise
            print(f"{PROG}: error: {_in_flags(_one_line(err))}", file=sys.stderr)
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
            return EXIT_FAILURE
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
