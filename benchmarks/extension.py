"""Extension benchmark: new cell types added to a trained model vs retraining vs a flat model.

For each dataset, two cell types are held out of training ("new" types). Every model works in the
package's default configuration: the out-of-fold scores (``sb.tl.pca_out_of_fold``) on the
30-PC PCA of ALL train cells (a reference representation that covers the new types; see
``split_types``), set up with the counts, so cells are decoded with the negative binomial.
Compared, each generating 200 cells per type (seed 0) and judged by ``scbranch.tl.evaluate``
against held-out real cells (reference PCA fitted on the train cells; label fidelity with a
classifier trained on all train cells, MMD at the median bandwidth, W2; real-vs-real controls;
the known answer: real cells no model saw, scored exactly like generated cells):

  ARCH + add_classes       a tree model (ARCH: each of --architectures, by default the
                           branch-conditioned network and one head per branch) trained on the
                           old types, then ``add_classes`` with the new types' train cells (only
                           the new branches' weights train; train()'s rule for the new
                           cells: about 100 passes, at least 500 steps)
  conditioned + add_classes, rows only   the conditioned network extended with
                           ``own_head=False``: each new type's embedding and adapter rows
                           alone, without head blocks of its own (the default gives them)
  conditioned + add_classes, readout     ``own_head="readout"``: the rows and an output layer
                           of its own, reading the shared head blocks
  ... + shared fine-tune   the same, with add_classes(fine_tune_shared=True): the branches above
                           the new branch points also train, with replay of the reference cells
  ARCH, retrained          trained from scratch on all types (the same budget as the old model:
                           the package's default)
  flat, fine-tuned on new  a flat label-guided model (label slots for every type) trained on the
                           old types, then fine-tuned on the new types' cells only, for as many
                           steps as the first architecture's add_classes used in total
  flat, fine-tuned on all  the same pretrained flat model fine-tuned on all train cells instead
  probe: real cells, unseen  the known answer (must score like the control)

Old-type quality is reported before and after extension / fine-tuning; for the tree models the
old types' cells after extension are also checked to be bit-identical to those before (their
coordinates and their decoded counts).

With ``--seeds 0,1,2`` every model is trained and generates once per seed (the same seed for
training and generation) and the tables give the mean over seeds, with the sd of the new types'
label fidelity and the paired differences between the architectures; ``--no-flat`` leaves the
flat rows out (they do not depend on the tree architecture).

Usage (from the repository root, in the project's venv):
  python benchmarks/extension.py          # CPU settings, seed 0 (about 14 min on 2 cores)
  python benchmarks/extension.py --seeds 0,1,2 --no-flat   # the architectures, 3 seeds
  python benchmarks/extension.py --seeds 0,1,2 --no-flat --architectures conditioned \
      --head-floor 1000   # add_classes with train()'s floor instead of its own 500 steps
  python benchmarks/extension.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/extension.md and CSVs under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from quality import (
    LABELS,
    LATENT,
    LOADERS,
    SPLIT,
    TrainCellsProbe,
    _md,
    cpu_threads,
    prepare_run,
    write_lines,
)

SETTINGS = {
    # steps None: the package's default budget (about 100 epochs, 1,000-16,000 steps)
    "cpu": {"steps": None, "batch_size": 64, "n_cells": 200, "ext_epochs": None},
    "fast": {"steps": 20, "batch_size": 64, "n_cells": 30, "ext_epochs": 1},
}
KNOWN_ANSWER = "probe: real cells, unseen"
NEW_TYPES = {"pbmc3k": ["FCGR3A Mono", "NK"], "pbmc68k": ["Dendritic", "CD56+ NK"]}
METRICS = ["label_fidelity", "mmd_median", "w2"]
#: the conditioned network's lighter extensions: ``own_head`` value -> row name
OWN_PARTS = {False: "rows only", "readout": "readout"}
OWN_PARTS_SAY = {
    "rows only": "the new types' embedding and adapter rows alone, no head parts of their own",
    "readout": "the rows and an output layer of their own on the shared head blocks",
}
SPACE = "reference_pca"

logger = logging.getLogger("extension")


def split_types(train, new_types):
    """The old types' train cells and the new types' train cells.

    Every model works in the 30 PCs of ALL train cells, as when a lab's representation comes
    from a reference atlas that covers the new types: a PCA of the old types alone cannot
    represent what sets the new types apart, and then no method (retraining included) gets
    their identity right (pbmc3k: label fidelity 0.17 retrained, against 0.96 for real cells).
    """
    is_new = train.obs[LABELS].isin(new_types).to_numpy()
    old = train[~is_new].copy()
    old.obs[LABELS] = old.obs[LABELS].cat.remove_unused_categories()
    return old, train[is_new].copy()


def _epochs(n_cells: int, steps: int | None, batch_size: int) -> int:
    """Epochs for ``steps`` optimiser steps; `None`: the package's default budget."""
    from scbranch.module._recipe import default_max_epochs

    steps_per_epoch = max(1, math.ceil(n_cells / batch_size))
    if steps is None:
        return default_max_epochs(n_cells, batch_size)
    return max(1, math.ceil(steps / steps_per_epoch))


def _head_floor_in_use() -> int:
    from scbranch.module import _extension

    return _extension.MIN_HEAD_STEPS


def set_head_floor(steps: int) -> int:
    """Make ``add_classes`` use ``steps`` as its floor; returns the package's own floor.

    The floor is a module constant of the package (``MIN_HEAD_STEPS``), read by
    ``default_head_steps`` each time a type is added, so this reads the package's rule with
    another floor and nothing else changed (a benchmark lever, not an option users need:
    they pass ``max_epochs``).
    """
    from scbranch.module import _extension

    before = _head_floor_in_use()
    _extension.MIN_HEAD_STEPS = steps
    return before


def _same(a, b) -> bool:
    """Bit-identical cells: the same coordinates and the same decoded expression."""
    from scbranch._validation import to_dense

    return bool(
        np.array_equal(a.obsm[LATENT], b.obsm[LATENT])
        and np.array_equal(to_dense(a.X), to_dense(b.X))
    )


def setup(adata) -> None:
    """The default configuration: out-of-fold PC scores, counts for the NB decoder."""
    import scbranch as sb

    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key=LATENT, counts_layer="counts"
    )


def _reseed(seed: int) -> None:
    """Every model starts from the same random state, whatever ran before it: without this, a
    change in one row's number of random draws (e.g. the flat fine-tunes' steps) moved every
    later row, those of the next dataset included."""
    import scvi

    scvi.settings.seed = seed


def _generate(model, n_cells: int, seed: int, labels=None):
    """``n_cells`` of every type (or of ``labels``), generated with ``seed``."""
    return model.generate(n_cells=n_cells, labels=labels, seed=seed, progress_bar=False)


def _score(gen, held, train, groups, seed=0) -> dict:
    import scbranch as sb

    report = sb.tl.evaluate(
        gen, held, LABELS, train=train, groups=groups, metrics=METRICS, seed=seed
    )
    rows = report[(report.space == SPACE) & (report.group != "mean")]
    return {m: rows[rows.metric == m].set_index("group")[["generated", "control"]] for m in METRICS}


def _both(gen, held, train, old: list[str], new: list[str]) -> dict:
    """Old types scored among the old types only (as before extension), new among all."""
    return {
        **_summary(_score(gen, held, train, old), old, []),
        **_summary(_score(gen, held, train, old + new), [], new),
    }


def _summary(scores: dict, old: list[str], new: list[str]) -> dict:
    out = {}
    for m in METRICS:
        table = scores[m]
        for kind, groups in (("old", old), ("new", new)):
            present = [g for g in groups if g in table.index]
            if present:
                out[f"{kind} {m}"] = table.loc[present, "generated"].mean()
                out[f"{kind} {m} (control)"] = table.loc[present, "control"].mean()
    return out


def run_dataset(name: str, train, held, unseen, cfg, seed: int = 0) -> dict:
    """Every row of one dataset, each model trained and generating with ``seed``."""
    import scbranch as sb

    # out-of-fold scores of every train cell (new types included) on the shared PCA
    if LATENT not in train.obsm:
        sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENT)
    new_types = NEW_TYPES[name]
    old_data, new_data = split_types(train, new_types)
    old_types = list(old_data.obs[LABELS].cat.categories)
    bs, n = cfg["batch_size"], cfg["n_cells"]
    logger.info(
        "%s: old %d cells (%d types), new %s (%d cells)",
        name,
        old_data.n_obs,
        len(old_types),
        new_types,
        new_data.n_obs,
    )
    rows, timing = [], {}
    # the known answer: real cells no model saw, judged like every generator's cells
    probe = TrainCellsProbe(unseen).generate(n, seed)
    rows.append(
        {
            "method": KNOWN_ANSWER,
            "stage": "after",
            **_both(probe, held, train, old_types, new_types),
        }
    )

    def gen(model, labels=None):
        return _generate(model, n, seed, labels)

    def extend(model, fine_tune_shared: bool, **options) -> float:
        t = time.perf_counter()
        model.add_classes(
            new_data,
            labels=new_types,
            max_epochs=cfg["ext_epochs"],
            batch_size=bs,
            fine_tune_shared=fine_tune_shared,
            progress_bar=False,
            **options,
        )
        return time.perf_counter() - t

    def fit_all(model) -> float:
        """Full training on every cell the model was set up with; returns seconds."""
        t = time.perf_counter()
        n_obs = model.adata.n_obs
        model.train(
            max_epochs=_epochs(n_obs, cfg["steps"], bs), batch_size=bs, enable_progress_bar=False
        )
        return time.perf_counter() - t

    identical, extensions, ext_steps = {}, {}, None
    for arch in cfg["architectures"]:
        # the tree model: old types, then add_classes (and the shared fine-tune variant)
        setup(old_data)
        _reseed(seed)
        model = sb.BranchedDiffusion(old_data, architecture=arch)
        timing[f"train old ({arch})"] = fit_all(model)
        model.save("old_model", overwrite=True)  # the start of the shared fine-tuning variant
        before = gen(model, old_types)
        before_scores = _score(before, held, train, old_types)
        timing[f"add_classes ({arch})"] = extend(model, fine_tune_shared=False)
        steps = sum(e["n_steps"] for e in model.extensions_)
        ext_steps = steps if ext_steps is None else ext_steps  # the flat fine-tunes' budget
        after_old = gen(model, old_types)
        identical[arch] = _same(before, after_old)
        extensions[arch] = [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}
            for e in model.extensions_
        ]
        method = f"{arch} + add_classes"
        rows.append({"method": method, "stage": "before", **_summary(before_scores, old_types, [])})
        rows.append(
            {
                "method": method,
                "stage": "after",
                **_both(gen(model), held, train, old_types, new_types),
            }
        )
        # the same start, extended with fine_tune_shared=True (gives up zero forgetting)
        variant = sb.BranchedDiffusion.load("old_model")
        timing[f"add_classes + shared fine-tune ({arch})"] = extend(variant, fine_tune_shared=True)
        rows.append(
            {
                "method": f"{method} + shared fine-tune",
                "stage": "after",
                **_both(gen(variant), held, train, old_types, new_types),
            }
        )
        for own_head, kind in OWN_PARTS.items() if arch == "conditioned" else ():
            # the same start; new types without head blocks of their own
            lighter = sb.BranchedDiffusion.load("old_model")
            timing[f"add_classes, {kind} ({arch})"] = extend(lighter, False, own_head=own_head)
            identical[f"{arch}, {kind}"] = _same(before, gen(lighter, old_types))
            rows.append(
                {
                    "method": f"{method}, {kind}",
                    "stage": "after",
                    **_both(gen(lighter), held, train, old_types, new_types),
                }
            )
        # retrained from scratch on everything
        full = train.copy()
        setup(full)
        _reseed(seed)
        retrained = sb.BranchedDiffusion(full, architecture=arch)
        timing[f"retrain all ({arch})"] = fit_all(retrained)
        rows.append(
            {
                "method": f"{arch}, retrained",
                "stage": "after",
                **_both(gen(retrained), held, train, old_types, new_types),
            }
        )

    result = {
        "rows": pd.DataFrame(rows).assign(seed=seed),
        "timing": timing,
        "identical": identical,
        "extensions": extensions,
        "ext_steps": ext_steps,
        "new_types": new_types,
    }
    if cfg["flat"]:
        result["rows"] = pd.concat(
            [
                result["rows"],
                _flat_rows(
                    retrained, train, held, old_types, new_types, cfg, seed, ext_steps, timing
                ),
            ],
            ignore_index=True,
        )
    return result


def _flat_rows(retrained, train, held, old_types, new_types, cfg, seed, ext_steps, timing):
    """A flat label-guided model pretrained on the old types, fine-tuned two ways."""
    import scbranch as sb

    bs, n = cfg["batch_size"], cfg["n_cells"]
    rows = []

    def gen(model, labels=None):
        return _generate(model, n, seed, labels)

    # flat: label slots for every type, pretrained on the old types' cells only
    flat_data = train.copy()
    setup(flat_data)
    _reseed(seed)
    flat = sb.BranchedDiffusion(flat_data, architecture="flat", hierarchy=retrained.tree.to_dict())
    is_new = flat_data.obs[LABELS].isin(new_types).to_numpy()
    empty = np.array([], dtype=int)
    everything = np.arange(flat_data.n_obs)

    def fit(model, idx, steps):
        t = time.perf_counter()
        model.train(
            max_epochs=_epochs(len(idx), steps, bs),
            batch_size=bs,
            enable_progress_bar=False,
            # scvi-tools wants every cell in a split: the unused ones go to "test"
            datasplitter_kwargs={"external_indexing": [idx, empty, np.setdiff1d(everything, idx)]},
        )
        return time.perf_counter() - t

    timing["train old (flat)"] = fit(flat, np.flatnonzero(~is_new), cfg["steps"])
    rows.append(
        {
            "method": "flat",
            "stage": "before",
            **_summary(_score(gen(flat, old_types), held, train, old_types), old_types, []),
        }
    )
    pretrained = copy.deepcopy(flat.module.state_dict())
    for label, idx in (("new", np.flatnonzero(is_new)), ("all", everything)):
        flat.module.load_state_dict(pretrained)
        _reseed(seed)
        timing[f"fine-tune flat on {label}"] = fit(flat, idx, ext_steps)
        rows.append(
            {
                "method": f"flat, fine-tuned on {label}",
                "stage": "after",
                **_both(gen(flat), held, train, old_types, new_types),
            }
        )
    return pd.DataFrame(rows).assign(seed=seed)


def write_markdown(path: Path, results: dict, cfg_name: str, cfg: dict, wall_s: float) -> str:
    budget = (
        "the package's default budget (about 100 epochs within 1,000-16,000 optimiser steps)"
        if cfg["steps"] is None
        else f"{cfg['steps']} optimiser steps"
    )
    seeds = cfg["seeds"]
    floor = cfg.get("head_floor")
    if cfg["ext_epochs"] is not None:
        head_rule = f"add_classes at max_epochs={cfg['ext_epochs']}"
    elif floor is None:
        head_rule = (
            f"add_classes' default rule (at least {_head_floor_in_use():,} steps per new type)"
        )
    else:
        head_rule = f"add_classes' default rule with a floor of {floor:,} steps per new type"
    lines = [
        "# Extension benchmark: new cell types without retraining",
        "",
        f"Generated by `python benchmarks/extension.py{cfg.get('command', '')}` ({cfg_name} "
        f"settings: {budget} at batch {cfg['batch_size']} for full training, {head_rule}, "
        f"{cfg['n_cells']} cells per type, seeds {seeds}: each model trained and generating "
        f"with the seed); total {wall_s / 60:.1f} min on {cpu_threads()}.",
        "",
        "Configuration: the package's default. Every model works on the train cells' "
        "out-of-fold scores (`sb.tl.pca_out_of_fold`) on the PCA of all train cells, set up with "
        "the counts, so its cells are decoded with the negative binomial. Split per type: "
        f"train / held-out / unseen {' / '.join(f'{f:.0%}' for f in SPLIT)}.",
        "",
        "Means over the old and over the new types of `sb.tl.evaluate` (reference PCA fitted "
        "on the train cells only; held-out, generated and unseen cells are out-of-sample for "
        "it), then over seeds; the control is real held-out half A vs half B. Label fidelity: "
        "a kNN classifier trained on all train cells. Read every row against the known answer "
        f"`{KNOWN_ANSWER}` (real cells no model saw, scored like generated cells): it must sit "
        "at the control.",
    ]
    for name, res in results.items():
        runs = res["rows"]
        table = runs.drop(columns="seed").groupby(["method", "stage"], sort=False).mean()
        per_seed = runs.set_index(["method", "stage", "seed"])["new label_fidelity"]
        timing = pd.DataFrame(res["timing"]).mean()  # seconds, mean over seeds
        lines += ["", f"## {name}: new types {', '.join(res['new_types'])}", "", _md(table), ""]
        known = table.loc[(KNOWN_ANSWER, "after")]
        lines.append(
            "- Known answer, real cells no model saw: "
            + "; ".join(
                f"{kind} types' {m} {known[f'{kind} {m}']:.3g} (control "
                f"{known[f'{kind} {m} (control)']:.3g})"
                for kind in ("old", "new")
                for m in ("label_fidelity", "mmd_median")
            )
            + "."
        )
        for arch in cfg["architectures"]:
            added = per_seed.loc[(f"{arch} + add_classes", "after")]
            retrained = per_seed.loc[(f"{arch}, retrained", "after")]
            add_s, retrain_s = timing[f"add_classes ({arch})"], timing[f"retrain all ({arch})"]
            lines += [
                f"- **{arch}**: old types' cells after `add_classes`, same seed, sampled alone: "
                f"bit-identical to before in {sum(i[arch] for i in res['identical'])} of "
                f"{len(seeds)} seeds. New types' label fidelity {_spread(added)} with "
                f"`add_classes` vs {_spread(retrained)} retrained (ratio "
                f"{added.mean() / retrained.mean():.2f}); time {add_s:.1f} s vs "
                f"{retrain_s:.1f} s (ratio {add_s / retrain_s:.2f}). Placement: "
                + "; ".join(
                    f"{e['label']} joins {e['joins']} at t = {e['t']:.3f}"
                    for e in res["extensions"][0][arch]
                )
                + ".",
            ]
        for own_head, kind in OWN_PARTS.items() if "conditioned" in cfg["architectures"] else ():
            own = per_seed.loc[("conditioned + add_classes", "after")]
            alone = per_seed.loc[(f"conditioned + add_classes, {kind}", "after")]
            lines.append(
                f"- **conditioned, {kind}** (`own_head={own_head!r}`: {OWN_PARTS_SAY[kind]}): "
                "old types bit-identical in "
                f"{sum(i[f'conditioned, {kind}'] for i in res['identical'])} of "
                f"{len(seeds)} seeds; new types' label fidelity {_spread(alone)}; own head "
                f"blocks (the default) minus {kind}, paired by seed: "
                f"{_spread(own - alone, True)}."
            )
        archs = list(cfg["architectures"])
        for a, b in zip(archs, archs[1:], strict=False):
            for kind, method in (
                ("add_classes", "{} + add_classes"),
                ("retrained", "{}, retrained"),
            ):
                diff = (
                    per_seed.loc[(method.format(a), "after")]
                    - per_seed.loc[(method.format(b), "after")]
                )
                lines.append(
                    f"- New types' label fidelity, {a} minus {b} ({kind}), paired by seed: "
                    f"{_spread(diff, signed=True)}."
                )
        lines += [
            "- The 'after' rows sample all types together, so the new branch points enter the "
            "time grid and old types' cells differ from 'before' by sampling noise only.",
        ]
        if cfg["flat"]:
            lines.append(
                "- The flat fine-tunes run as many steps as the first architecture's "
                f"`add_classes` ({res['ext_steps']})."
            )
        lines.append(
            "- Wall times (s, mean over seeds): "
            + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())
        )
    return write_lines(path, lines)


def _spread(values: pd.Series, signed: bool = False) -> str:
    """``mean ± sd`` over seeds (the mean alone for one seed)."""
    fmt = "+.3f" if signed else ".3f"
    if len(values) < 2:
        return f"{values.mean():{fmt}}"
    return f"{values.mean():{fmt}} ± {values.std(ddof=1):.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc3k,pbmc68k")
    parser.add_argument("--out", default="benchmark_out/extension", help="CSVs")
    parser.add_argument("--markdown", default=None, help="default: docs/benchmarks/extension.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--architectures",
        default="conditioned,branched",
        help="tree architectures extended and retrained, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds", default="0", help="training and generation seeds (default: %(default)s)"
    )
    parser.add_argument("--no-flat", action="store_true", help="leave out the flat model's rows")
    parser.add_argument(
        "--head-floor",
        type=int,
        default=None,
        help="add_classes' floor of optimiser steps per new type instead of the package's "
        "MIN_HEAD_STEPS (the rest of its rule unchanged)",
    )
    args = parser.parse_args(argv)
    if args.head_floor is not None and args.head_floor < 1:
        parser.error(f"--head-floor must be a positive number of steps, got {args.head_floor}")
    cfg_name = "fast" if args.fast else "cpu"
    cfg = {
        **SETTINGS[cfg_name],
        "architectures": tuple(args.architectures.split(",")),
        "seeds": [int(s) for s in args.seeds.split(",")],
        "flat": not args.no_flat,
        "head_floor": args.head_floor,
        "command": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    }
    markdown = prepare_run(args, "extension")
    if args.head_floor is not None:
        set_head_floor(args.head_floor)
    loaders = LOADERS
    results = {}
    t0 = time.perf_counter()
    for name in args.datasets.split(","):
        train, held, unseen = loaders[name](seed=0, fractions=SPLIT)
        runs = [run_dataset(name, train, held, unseen, cfg, seed) for seed in cfg["seeds"]]
        res = {
            "rows": pd.concat([r["rows"] for r in runs], ignore_index=True),
            "timing": [r["timing"] for r in runs],
            "identical": [r["identical"] for r in runs],
            "extensions": [r["extensions"] for r in runs],
            "ext_steps": runs[0]["ext_steps"],
            "new_types": runs[0]["new_types"],
        }
        res["rows"].to_csv(f"rows_{name}.csv", index=False)
        Path(f"meta_{name}.json").write_text(
            json.dumps({k: v for k, v in res.items() if k != "rows"}, default=float)
        )
        results[name] = res
    print(write_markdown(markdown, results, cfg_name, cfg, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
