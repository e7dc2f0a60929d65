"""Write a model directory the way scbranch < 0.2 did (pickles), for the tests of old formats.

scbranch 0.1 saved through scvi-tools: ``model.pt`` = ``torch.save({"model_state_dict",
"var_names", "attr_dict"})`` of every attribute ending in ``_`` (the representation's decoder,
scVI info and count pools among them), and its scVI model with scvi-tools' own ``save`` in
``scvi/``. This rebuilds that layout from a current model.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


class Payload:
    """Unpickling this runs code: it writes ``marker`` (the attack a reviewer demonstrated)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model_state_dict": Payload(marker)})


def save_legacy(model, directory: Path) -> None:
    """``directory`` as scbranch 0.1 would have saved ``model``."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    space = model.space
    attrs = {k: v for k, v in vars(model).items() if k.endswith("_") and not k.startswith("_")}
    init = {**attrs["init_params_"], "non_kwargs": dict(attrs["init_params_"]["non_kwargs"])}
    init["non_kwargs"].pop("space", None)
    attrs["init_params_"] = init
    attrs["decoder_"] = getattr(space, "decoder", None)
    counts = getattr(space, "counts", None)
    attrs["size_factors_"] = None if counts is None else counts.pools
    attrs["scvi_info_"] = getattr(space, "info", None)
    attrs["library_sizes_"] = getattr(space, "library_sizes", None)
    torch.save(
        {
            "model_state_dict": model.module.state_dict(),
            "var_names": np.asarray(model.get_var_names()),
            "attr_dict": attrs,
        },
        directory / "model.pt",
    )
    if space.nested_model is not None:
        space.nested_model.save(str(directory / "scvi"), overwrite=True, save_anndata=False)


def save_without_option(model, directory: Path, option: str) -> None:
    """``model`` saved as before ``option`` existed: its init parameter left out of the file."""
    from scbranch.model._persistence import PLAIN, read_plain, write_plain

    model.save(directory)
    json_path, npz_path = (Path(directory) / name for name in PLAIN)
    content = read_plain(json_path, npz_path, kind="model")
    del content["attributes"]["init_params_"]["non_kwargs"][option]
    write_plain(content, json_path, npz_path, kind="model")
