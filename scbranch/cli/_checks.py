"""The command line's argument types, input checks and exit statuses."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PROG = "scbranch"
#: Exit status of a run stopped by bad user input (same as argparse's usage errors).
EXIT_USAGE = 2
#: Exit status of a run stopped by anything else (a failure that is not the input's fault), so
#: scripts can tell "fix your command" (2) from "this broke" (1).
EXIT_FAILURE = 1
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


def _check_output_file(
    path: Path,
    overwrite: bool,
    inputs: Mapping[str, str | None] | None = None,
    option: str = "--out",
    kind: str = "a file name ending in .h5ad or .zarr",
) -> None:
    """Refuse to replace an existing file or store unless ``overwrite`` (or a directory).

    ``inputs`` (flag -> path) are files this command reads: never replaced, ``--overwrite``
    or not (``--anchors cells.h5ad --out cells.h5ad --overwrite`` replaced the user's cells).
    ``option`` and ``kind`` name the output's flag and what it should be, for the messages.
    """
    for flag, source in (inputs or {}).items():
        if source is not None and path.resolve() == Path(source).resolve():
            raise FileExistsError(
                f"{option} {str(path)!r} is the file {flag} reads; writing there would destroy "
                "it, even with --overwrite. Choose another name."
            )
    if path.is_dir() and path.suffix != ".zarr":
        raise FileExistsError(f"{option} {str(path)!r} is a directory; give {kind}.")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{option} {str(path)!r} already exists; choose another file or pass --overwrite to "
            "replace it."
        )
    # a name ending in neither .h5ad nor .zarr: generate(out=) warns (written as .h5ad)


def _read_h5ad(path: Path):
    import anndata

    if path.is_dir():  # said "No such .h5ad file" of a folder that exists
        raise FileNotFoundError(
            f"{str(path)!r} is a directory, not an .h5ad file (a zarr store's name ends in .zarr)."
        )
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


def _parsed(text: str, kind: type):
    """``text`` as ``kind`` (``int`` or ``float``), or `None` if it is not one."""
    try:
        return kind(text)
    except ValueError:
        return None


def _device(text: str) -> int | str:
    """``auto`` or the index of one device."""
    text = text.strip()
    if text == "auto":
        return text
    value = _parsed(text, int)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a device index, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A share of the cells, in (0, 1)."""
    value = _parsed(text, float)
    if value is None or not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _anchor_time(text: str) -> float:
    """A time in (0, 1] (the model checks it against its own ``t_min``)."""
    value = _parsed(text, float)
    if value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a time in (0, 1], got {text!r}")
    return value


_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: ``generate --noise`` -> ``BranchedDiffusion.generate(residual_noise=...)``
NOISE_OPTIONS = {"auto": "auto", "none": False, "gaussian": True, "nb": "nb"}


def _check_accelerator(name: str, device: int | str = "auto") -> None:
    """Fail early (before reading data) when the requested accelerator is not available.

    A device index names a GPU: on a machine without one it was ignored, silently.
    """
    import torch

    if device != "auto" and name == "cpu":
        raise CLIError(f"--device {device} names a GPU; with --accelerator cpu drop --device.")
    if device != "auto" and name == "auto" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {device} names a GPU, but no CUDA GPU is available here; drop --device "
            "(the CPU is used)."
        )
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
