"""New cell types without retraining: placement, zero forgetting, persistence, bad input."""

import anndata as ad
import numpy as np
import pytest
import torch

import scbranch as sb
from scbranch.model._counts import class_ratios
from scbranch.module import BranchTree

FAST = {"width": 32, "n_head_blocks": 1}
REP = "X_latent"


def _sim(n_per_class: int = 80, depth: int = 2, seed: int = 0) -> ad.AnnData:
    """Cells on a known binary tree: ((c0, c1), (c2, c3)) for depth 2."""
    return sb.datasets.simulate_tree(
        depth=depth, n_per_class=n_per_class, dim=8, seed=seed
    ).to_anndata()


def _without(adata: ad.AnnData, labels: list[str]) -> ad.AnnData:
    old = adata[~adata.obs["cell_type"].isin(labels)].copy()
    old.obs["cell_type"] = old.obs["cell_type"].cat.remove_unused_categories()
    return old


def _model(
    adata: ad.AnnData, max_epochs: int = 50, architecture: str = "branched"
) -> sb.BranchedDiffusion:
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key=REP)
    model = sb.BranchedDiffusion(adata, architecture=architecture, **FAST)
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    return model


def _old_cells(model, classes, seed=1):
    return model.generate(n_cells=30, labels=classes, seed=seed, progress_bar=False)


def _interpretations(model, old, classes) -> dict:
    """Old types' trajectories and a transmutation: their clean-cell estimates included."""
    source = old[old.obs["cell_type"] == classes[0]][:10].copy()
    return {
        "trajectories": model.generate(
            n_cells=10,
            labels=classes,
            seed=1,
            trajectory_times=[1.0, 0.7, 0.4, 0.1, 0.0],
            progress_bar=False,
        ),
        "transmutation": model.transmute(source, target=classes[1], progress_bar=False),
        "sde transmutation": model.transmute(
            source, target=classes[2], mode="sde", seed=0, progress_bar=False
        ),
    }


@pytest.fixture(scope="module", params=["branched", "conditioned"])
def extended(request):
    sim = _sim()
    old = _without(sim, ["c3"])
    model = _model(old, architecture=request.param)
    classes = list(model.classes)
    before = {
        solver: _old_cells(model, classes)
        if solver == "heun"
        else model.generate(
            n_cells=30, labels=classes, seed=1, solver=solver, n_steps=60, progress_bar=False
        )
        for solver in ("heun", "em")
    }
    old_tree = model.tree
    # one thread, as the tests run (conftest's fixture does not reach a module fixture): a
    # reduction split over other threads rounds differently in the last bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interpretations = _interpretations(model, old, classes)
    finally:
        torch.set_num_threads(threads)
    model.add_classes(sim, labels=["c3"], max_epochs=50, progress_bar=False)
    return {
        "model": model,
        "before": before,
        "interpretations": interpretations,
        "classes": classes,
        "sim": sim,
        "old": old,
        "old_tree": old_tree,
    }


def test_old_classes_are_bit_identical_after_extension(extended, tmp_path):
    model, classes = extended["model"], extended["classes"]
    after = _old_cells(model, classes)
    np.testing.assert_array_equal(after.obsm[REP], extended["before"]["heun"].obsm[REP])
    em = model.generate(
        n_cells=30, labels=classes, seed=1, solver="em", n_steps=60, progress_bar=False
    )
    np.testing.assert_array_equal(em.obsm[REP], extended["before"]["em"].obsm[REP])
    # ... and after save / load, with and without the training data
    model.save(tmp_path / "m")
    for adata in (None, extended["old"]):
        loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=adata)
        assert loaded.classes == [*classes, "c3"]
        again = _old_cells(loaded, classes)
        np.testing.assert_array_equal(again.obsm[REP], extended["before"]["heun"].obsm[REP])


def test_old_types_interpretations_are_bit_identical_after_extension(extended, tmp_path):
    # their clean-cell estimates too: the calibrated denoiser's Gaussians and weights come
    # from the classes each head was trained on (before, from every stored type's cells,
    # which moved a transmutation's X_pca by up to 0.057 in an audit)
    model, old, classes = extended["model"], extended["old"], extended["classes"]
    assert model.tree.branches[model.tree.root].trained == (0, 1, 2)
    model.save(tmp_path / "m")
    for current in (model, sb.BranchedDiffusion.load(tmp_path / "m")):
        after = _interpretations(current, old, classes)
        for kind, before in extended["interpretations"].items():
            np.testing.assert_array_equal(after[kind].obsm[REP], before.obsm[REP], err_msg=kind)
            np.testing.assert_array_equal(after[kind].X, before.X, err_msg=kind)


def test_new_class_is_placed_where_its_crossover_says(extended):
    model, old_tree = extended["model"], extended["old_tree"]
    tree = model.tree
    record = model.extensions_[-1]
    assert record["joins"] == "c2"  # the simulated tree's true sibling
    c3 = tree.classes.index("c3")
    assert tree.branch_time(c3, tree.classes.index("c2")) == pytest.approx(record["t"])
    # consistency: every class on exactly one branch at every time
    for c in range(tree.n_classes):
        for t in np.linspace(0, 0.999, 200):
            holding = [b.id for b in tree.branches if c in b.classes and b.t_start <= t < b.t_end]
            assert len(holding) == 1
            assert tree.lookup(np.array([c]), t)[0] == holding[0]
    # the old classes use the same heads at every time, so their grid is unchanged
    for c in range(old_tree.n_classes):
        for t in np.linspace(0, 0.999, 50):
            old_head = old_tree.heads_of(old_tree.lookup(np.array([c]), t))
            new_head = tree.heads_of(tree.lookup(np.array([c]), t))
            assert old_head == new_head
    assert tree.breakpoints(range(3)) == old_tree.breakpoints(range(3))
    assert record["t"] in tree.breakpoints([c3])


def test_new_class_cells_look_like_the_new_class(extended):
    from sklearn.neighbors import KNeighborsClassifier

    model, sim = extended["model"], extended["sim"]
    gen = model.generate(n_cells={"c3": 100}, seed=0, progress_bar=False)
    knn = KNeighborsClassifier(5).fit(sim.obsm[REP], sim.obs["cell_type"].astype(str))
    assert (knn.predict(gen.obsm[REP]) == "c3").mean() > 0.8
    assert list(gen.obs["cell_type"].cat.categories) == ["c0", "c1", "c2", "c3"]
    ext = gen.uns["scbranch"]["model"]["extensions"]
    assert list(ext["label"]) == ["c3"] and list(ext["joins"]) == ["c2"]
    # the architecture's learning rate: a conditioned branch's two rows at 1e-3 gave cells of
    # the sibling type (12 % kept c3 here), hence its own default
    expected = {"branched": 1e-3, "conditioned": 3e-2}[model.module.architecture]
    assert model.extensions_[-1]["lr"] == expected
    assert list(ext["lr"]) == [expected]  # in the cells' record too
    # by default a conditioned network's new type has head blocks of its own
    conditioned = model.module.architecture == "conditioned"
    assert model.extensions_[-1]["own_head"] == conditioned
    assert list(ext["own_head"]) == [conditioned]  # in the cells' record too
    assert list(ext["own_readout"]) == [False]
    if conditioned:
        assert list(model.module.net.branch_heads) == [str(model.tree.n_heads - 1)]


def test_own_head_false_or_readout_on_a_conditioned_network_and_refused_elsewhere(tmp_path):
    sim = _sim()
    old = _without(sim, ["c3"])
    model = _model(old, max_epochs=5, architecture="conditioned")
    model.add_classes(sim, labels=["c3"], max_epochs=2, own_head=False, progress_bar=False)
    assert len(model.module.net.branch_heads) == 0 and not model.extensions_[-1]["own_head"]
    reading = _model(old, max_epochs=5, architecture="conditioned")
    reading.add_classes(sim, labels=["c3"], max_epochs=2, own_head="readout", progress_bar=False)
    net, record = reading.module.net, reading.extensions_[-1]
    assert len(net.branch_heads) == 0 and list(net.branch_readouts) == [
        str(net.n_branch_functions - 1)
    ]
    assert record["own_readout"] and not record["own_head"]
    gen = reading.generate(n_cells=3, seed=0, progress_bar=False)
    assert list(gen.uns["scbranch"]["model"]["extensions"]["own_readout"]) == [True]
    reading.save(tmp_path / "m")  # the output layer comes back with the weights
    again = sb.BranchedDiffusion.load(tmp_path / "m", adata=old)
    np.testing.assert_array_equal(
        again.generate(n_cells=3, seed=0, progress_bar=False).obsm[REP], gen.obsm[REP]
    )
    branched = _model(old, max_epochs=1)
    for value in (False, "readout"):
        with pytest.raises(ValueError, match=f"own_head={value!r} applies to the conditioned"):
            branched.add_classes(sim, labels=["c3"], own_head=value, progress_bar=False)
    with pytest.raises(ValueError, match="own_head must be one of None, True, False, 'blocks'"):
        model.add_classes(sim, labels=["c3"], own_head="head", progress_bar=False)
    assert branched.classes == model.classes[:-1]  # refused before anything changed


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_a_learning_rate_that_cannot_train_is_refused(extended, lr):
    model, sim = extended["model"], extended["sim"]
    before = list(model.classes)
    with pytest.raises(ValueError, match="lr must be a positive number.*lr=None"):
        model.add_classes(sim, labels=["c4"], lr=lr, progress_bar=False)
    assert list(model.classes) == before  # refused before anything changed


def test_branch_tree_plot_shows_the_new_class(extended):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = sb.pl.branch_tree(extended["model"].tree, show=False)
    labels = {t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()}
    labels |= {t.get_text() for t in ax.texts}
    assert "c3" in labels
    plt.close("all")


def test_several_classes_at_once_and_in_sequence():
    sim = _sim(n_per_class=60, depth=3, seed=1)  # 8 classes
    model = _model(_without(sim, ["c1", "c6", "c7"]), max_epochs=5)
    model.add_classes(sim, labels=["c1", "c6"], max_epochs=2, progress_bar=False)
    model.add_classes(sim, labels=["c7"], max_epochs=2, progress_bar=False)
    assert [e["label"] for e in model.extensions_] == ["c1", "c6", "c7"]
    assert model.classes[-3:] == ["c1", "c6", "c7"]
    joins = {e["label"]: e["joins"] for e in model.extensions_}
    assert joins["c1"] == "c0" and joins["c7"] == "c6"  # true siblings, even a new one
    model.tree.validate()
    gen = model.generate(n_cells=5, seed=0, progress_bar=False)
    assert gen.obs["cell_type"].value_counts().min() == 5


def test_extension_with_counts():
    adata = sb.datasets.pbmc68k()
    old = _without(adata, ["Dendritic"])
    sb.BranchedDiffusion.setup_anndata(
        old, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(old, **FAST)
    before = model.space.counts.nb["class_ratio"].copy()
    model.add_classes(adata, labels=["Dendritic"], max_epochs=1, progress_bar=False)
    gen = model.generate(n_cells={"Dendritic": 5}, seed=0, counts=True, progress_bar=False)
    counts = gen.layers["counts"]
    assert counts.shape == (5, adata.n_vars) and np.all(counts.data == np.round(counts.data))
    # the new type gets its own ratio per gene (what it holds outside the PCs); the known
    # types' ratios stay as they were, bit for bit
    nb, space = model.space.counts.nb, model.space
    np.testing.assert_array_equal(nb["class_ratio"][:-1], before)
    new = adata[adata.obs["cell_type"] == "Dendritic"]
    factors = space.counts.factors_of(new, "counts", None, space.var_names)
    decoded = np.expm1(np.clip(space.decode_estimates(space.encode(new)), 0, None))
    observed = new.layers["counts"]
    observed = observed.toarray() if hasattr(observed, "toarray") else np.asarray(observed)
    expected = class_ratios(
        observed,
        factors[:, None] * decoded * nb["scale"],
        np.zeros(new.n_obs, int),
    )
    np.testing.assert_allclose(nb["class_ratio"][-1], expected[0], rtol=1e-4)
    no_counts = adata[adata.obs["cell_type"] == "CD34+"].copy()
    no_counts.obs["cell_type"] = no_counts.obs["cell_type"].cat.rename_categories({"CD34+": "new"})
    del no_counts.layers["counts"]
    with pytest.raises(KeyError, match=r"lacks \(layers: \[\]\): store the cells' raw counts"):
        model.add_classes(no_counts, labels=["new"], min_cells=2, progress_bar=False)


def test_extension_bad_input(extended):
    model, sim = extended["model"], extended["sim"]
    with pytest.raises(ValueError, match=r"knows \['c2'\] already"):
        model.add_classes(sim, labels=["c2"], progress_bar=False)
    with pytest.raises(ValueError, match="holds no type the model does not know"):
        model.add_classes(sim, progress_bar=False)
    few = _sim(n_per_class=4, depth=2, seed=3)
    few.obs["cell_type"] = few.obs["cell_type"].cat.rename_categories({"c0": "tiny"})
    with pytest.raises(ValueError, match=r"'tiny' \(4 cells\).*min_cells=10"):
        model.add_classes(few, labels=["tiny"], progress_bar=False)
    with pytest.raises(ValueError, match="min_cells must be a whole number of at least 2"):
        model.add_classes(few, labels=["tiny"], min_cells=1, progress_bar=False)
    wrong = sim.copy()
    wrong.obs["cell_type"] = wrong.obs["cell_type"].cat.rename_categories({"c0": "new"})
    wrong.obsm[REP] = wrong.obsm[REP][:, :5]
    with pytest.raises(ValueError, match="5 dimensions, the model 8"):
        model.add_classes(wrong, labels=["new"], progress_bar=False)
    with pytest.raises(KeyError, match=r"No cells labelled \['absent'\]"):
        model.add_classes(sim, labels=["absent"], progress_bar=False)
    sb.BranchedDiffusion.setup_anndata(extended["old"], labels_key="cell_type", obsm_key=REP)
    flat = sb.BranchedDiffusion(extended["old"], architecture="flat", **FAST)
    with pytest.raises(ValueError, match="flat model has no branches"):
        flat.add_classes(sim, labels=["c3"], progress_bar=False)


def test_expression_model_refuses_other_genes():
    adata = sb.datasets.pbmc68k()
    old = _without(adata, ["Dendritic"])[:, :50].copy()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type")
    model = sb.BranchedDiffusion(old, **FAST)
    with pytest.raises(ValueError, match="genes of adata do not match the model's"):
        model.add_classes(adata[:, 10:60].copy(), labels=["Dendritic"], progress_bar=False)
    model.add_classes(adata[:, :50].copy(), labels=["Dendritic"], max_epochs=1, progress_bar=False)
    assert model.classes[-1] == "Dendritic"


def test_split_keeps_ids_and_heads():
    tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    new = tree.add_class("D", sibling=2, t=0.2)
    for b in tree.branches:  # old ids keep their heads; the split branch keeps its id
        assert new.branches[b.id].head == b.head
    assert new.n_heads == tree.n_heads + 1
    with pytest.raises(ValueError, match="already has a class 'A'"):
        tree.add_class("A", sibling=0, t=0.1)
    with pytest.raises(ValueError, match="start of a branch already"):
        tree.add_class("E", sibling=0, t=0.3)


def _branch_parameters(model, head: int) -> list[torch.Tensor]:
    """What only branch ``head`` uses: its head, or its embedding and adapter rows."""
    net = model.module.net
    if model.module.architecture == "branched":
        return [p.detach().clone() for p in net.heads[head].parameters()]
    return [
        net.branch_embed.weight[head].detach().clone(),
        net.branch_adapter.weight[head].detach().clone(),
    ]


@pytest.mark.parametrize("architecture", ["branched", "conditioned"])
def test_fine_tune_shared_trades_identity_for_the_shared_path(architecture):
    sim = _sim()
    model = _model(_without(sim, ["c3"]), architecture=architecture)
    classes = list(model.classes)
    before = _old_cells(model, classes)
    shared = [b.head for b in model.tree.branches if b.parent < 0]  # the root's head
    root_before = _branch_parameters(model, shared[0])
    model.add_classes(sim, labels=["c3"], max_epochs=5, fine_tune_shared=True, progress_bar=False)
    assert model.extensions_[-1]["fine_tune_shared"]
    root_after = _branch_parameters(model, shared[0])
    assert any(not torch.equal(a, b) for a, b in zip(root_before, root_after, strict=True))
    after = _old_cells(model, classes)
    assert not np.array_equal(after.obsm[REP], before.obsm[REP])  # documented: not zero-forgetting
    # the heads of c3's path above its branch point learnt it (clean estimates follow)
    path = [b for b in model.tree.path(3) if model.tree.branches[b].t_start > 0]
    assert path and all(3 in model.tree.branches[b].trained for b in path)
    # every requires_grad flag is restored
    assert all(p.requires_grad for p in model.module.parameters())


@pytest.mark.parametrize("solver", ["heun", "em", "ei", "dpm2m", "pc"])
def test_splitting_internal_branches_keeps_old_samples(solver):
    """New classes that split an INTERNAL branch, twice on one path, change nothing old."""
    from scbranch.module import BranchedDiffusionModule
    from scbranch.module._extension import Placement, extend_module

    torch.manual_seed(0)
    tree = BranchTree.from_merges(
        ["A", "B", "C", "D"], [((0,), (1,), 0.2), ((2,), (3,), 0.3), ((0, 1), (2, 3), 0.7)]
    )
    module = BranchedDiffusionModule(4, tree.to_dict(), width=16, n_head_blocks=1)
    for p in module.net.parameters():  # random, non-zero heads: every head matters
        torch.nn.init.normal_(p, std=0.3)
    counts = {0: 5, 1: 4, 3: 6}
    options = {"solver": solver, "n_steps": 30, "seed": 3}
    before = module.sample_cells(counts, **options).x
    # inside the (A, B) branch (0.2, 0.7), then again below that split, on the same path
    extend_module(module, "N1", Placement(sibling=0, t=0.5, crossover=np.zeros(4)))
    extend_module(module, "N2", Placement(sibling=1, t=0.35, crossover=np.zeros(5)))
    module.tree.validate()
    after = module.sample_cells(counts, **options).x
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # the new classes sample, and sampling them alongside changes nothing for themselves
    both = module.sample_cells({**counts, 4: 3, 5: 3}, **options)
    assert torch.isfinite(both.x).all() and both.x.shape == (21, 4)


def test_extension_wrong_key_and_nan(extended):
    model, sim = extended["model"], extended["sim"]
    new = sim.copy()
    new.obs["cell_type"] = new.obs["cell_type"].cat.rename_categories({"c0": "fresh"})
    with pytest.raises(KeyError, match="labels_key='kind' is not a column"):
        model.add_classes(new, labels=["fresh"], labels_key="kind", progress_bar=False)
    new.obsm[REP] = new.obsm[REP].copy()
    new.obsm[REP][0, 0] = np.nan  # the first cell is a "fresh" one
    assert new.obs["cell_type"].iloc[0] == "fresh"
    with pytest.raises(ValueError, match="representation of the new cells contains 1 NaN"):
        model.add_classes(new, labels=["fresh"], progress_bar=False)
    assert "fresh" not in model.classes  # nothing half-added


def test_placement_uses_the_discovery_options_of_the_model(monkeypatch, tmp_path):
    """A new class joins by the crossover rule the old classes were merged by, after load too."""
    from scbranch.module import _extension as extension_module

    sim = _sim(n_per_class=40)
    old = _without(sim, ["c3"])
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key=REP)
    options = {"epsilon": 0.01, "n_times": 120, "smooth_sigma": 2.0, "curves": "expected"}
    model = sb.BranchedDiffusion(old, discovery_kwargs=options, **FAST)
    model.train(max_epochs=2, enable_progress_bar=False)
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")

    seen = []
    real = extension_module.place_class

    def spy(*args, **kwargs):
        seen.append(args[5])  # the DiscoveryOptions
        return real(*args, **kwargs)

    monkeypatch.setattr(extension_module, "place_class", spy)
    loaded.add_classes(sim, labels=["c3"], max_epochs=1, progress_bar=False)
    (options,) = seen
    assert options.epsilon == 0.01 and options.n_times == 120
    assert options.smooth_sigma == 2.0 and options.curves == "expected"
    assert options.n_noise_draws == 1
    assert options.min_branch_length == 0.02  # the discovery default, recorded too
    assert loaded.extensions_[-1]["joins"] == "c2"


def test_extension_steps_follow_the_training_rule_for_the_new_cells():
    from scbranch.module._extension import default_head_steps
    from scbranch.module._recipe import MAX_DEFAULT_STEPS, MIN_HEAD_STEPS

    # a rare new type gets extension's floor of 500 steps, not train()'s 1,000
    assert default_head_steps(30, 64, None) == MIN_HEAD_STEPS == 500
    # a large one about 100 passes (79 steps an epoch), capped like train()
    assert default_head_steps(5_000, 64, None) == 7_900
    # whole passes: the cap is rounded up to 2 epochs of 15,625 steps, as in train()
    assert MAX_DEFAULT_STEPS < default_head_steps(1_000_000, 64, None) == 31_250
    steps = [default_head_steps(n, 64, None) for n in (10, 100, 1_000, 10_000, 100_000)]
    assert steps == sorted(steps)  # more cells never get fewer steps
    # an explicit max_epochs is passes over the new cells
    assert default_head_steps(130, 64, 3) == 9


def test_a_new_type_may_not_take_the_name_of_a_group():
    # generate({"left": n}) draws from the group; a new type named "left" took the name over
    # silently (the group could no longer be asked for)
    sim = _sim(n_per_class=20)
    old = sim[sim.obs["cell_type"] != "c3"].copy()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key=REP)
    model = sb.BranchedDiffusion(old, hierarchy={"left": ["c0", "c1"], "right": ["c2"]}, **FAST)
    assert "left" in model.tree.node_names
    new = sim[sim.obs["cell_type"] == "c3"].copy()
    new.obs["cell_type"] = new.obs["cell_type"].cat.rename_categories({"c3": "left"})
    with pytest.raises(ValueError, match=r"\['left'\] name\(s\) a group.*rename"):
        model.add_classes(new, labels=["left"], progress_bar=False)
    assert model.classes == ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"labels": []}, "labels is empty: nothing to add"),
        ({"max_epochs": 0}, "max_epochs must be a whole number of at least 1"),
        ({"max_epochs": 2.7}, "max_epochs must be a whole number of at least 1"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ({"batch_size": -4}, "batch_size must be a whole number of at least 1"),
        ({"ema_decay": 1.5}, r"ema_decay must lie in \[0, 1\)"),
    ],
)
def test_extension_settings_that_train_nothing_are_refused(extended, option, match):
    # each was accepted (max_epochs=0 trained a step, batch_size=-4 a slice of the cells) or
    # failed half-way (batch_size=0: ZeroDivisionError after the tree had grown)
    model, sim = extended["model"], extended["sim"]
    renamed = sim[sim.obs["cell_type"] == "c0"].copy()
    renamed.obs["cell_type"] = renamed.obs["cell_type"].cat.rename_categories({"c0": "c9"})
    kwargs = {"labels": ["c9"], "progress_bar": False, **option}
    with pytest.raises(ValueError, match=match):
        model.add_classes(renamed, **kwargs)
    assert "c9" not in model.classes and model.tree.classes == model.classes


def test_a_failed_extension_leaves_the_model_as_it_was(monkeypatch, tmp_path):
    # add_class_head grows the tree before it trains: an error (or Ctrl-C) in training left a
    # tree of more types than the model knew, and the saved model could not be loaded
    sim = _sim(n_per_class=20)
    model = _model(_without(sim, ["c3"]), max_epochs=2)
    before = model.generate(n_cells=5, seed=0, progress_bar=False)
    import scbranch.module._extension as module_extension

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module_extension, "train_heads", interrupted, raising=True)
    with pytest.raises(KeyboardInterrupt):
        model.add_classes(sim, labels=["c3"], max_epochs=1, progress_bar=False)
    assert model.tree.classes == model.classes == ["c0", "c1", "c2"]
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    after = loaded.generate(n_cells=5, seed=0, progress_bar=False)
    np.testing.assert_array_equal(after.obsm[REP], before.obsm[REP])
    monkeypatch.undo()
    model.add_classes(sim, labels=["c3"], max_epochs=1, progress_bar=False)  # a retry works
    assert model.classes == ["c0", "c1", "c2", "c3"]


def test_training_after_extension_is_refused_naming_the_way_to_train_every_type(tmp_path):
    # model.adata holds the old types only: train() trained them alone and moved the weights
    # the new type uses (its cells' mean drifted 0.8 -> 3.0 from the real one in the audit)
    sim = _sim(n_per_class=20)
    model = _model(_without(sim, ["c3"]), max_epochs=2)
    model.add_classes(sim, labels=["c3"], max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"holds no cells of \['c3'\].*load\(d, adata=all_cells"):
        model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "m")
    every = sb.BranchedDiffusion.load(tmp_path / "m", adata=sim.copy())
    root = every.tree.branches[every.tree.root]
    assert root.trained == (0, 1, 2)  # c3 passes through the root; its head never saw it
    every.train(max_epochs=1, enable_progress_bar=False)  # the way the message names
    assert every.is_trained and every.classes == ["c0", "c1", "c2", "c3"]
    # every head has now learnt every class on its branch: the saved tree says so
    assert all(b.trained == b.classes for b in every.tree.branches)
    every.save(tmp_path / "every")
    assert "trained" not in sb.BranchedDiffusion.load(tmp_path / "every").tree.to_dict()


def test_a_type_joining_inside_a_named_group_is_logged(caplog):
    # Dendritic joined CD14+ Monocyte inside a given "Myeloid" group in the audit, and
    # generate({"Myeloid": n}) then drew half of its cells from it, without a word
    sim = _sim(n_per_class=20, depth=3)  # (((c0, c1), (c2, c3)), ((c4, c5), (c6, c7)))
    old = _without(sim, ["c1"])
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key=REP)
    groups = {"left": ["c0", "c2", "c3"], "right": ["c4", "c5", "c6", "c7"]}
    model = sb.BranchedDiffusion(old, hierarchy=groups, **FAST)
    model.train(max_epochs=2, enable_progress_bar=False)
    with caplog.at_level("INFO", logger="scbranch"):
        model.add_classes(sim, labels=["c1"], max_epochs=1, progress_bar=False)
    joined = {g for g, types in sb.model._extension.named_groups(model).items() if "c1" in types}
    assert joined and all(g in caplog.text for g in joined)
    assert "named group(s)" in caplog.text


@pytest.mark.parametrize("architecture", ["branched", "conditioned"])
@pytest.mark.parametrize("gaussian_skip", ["global", "per_branch"])
def test_extension_keeps_every_buffer_on_the_models_device(architecture, gaussian_skip):
    # the 'meta' device stands in for a GPU: the branch-lookup tables were rebuilt on the CPU,
    # and add_classes failed on any GPU at its first lookup
    from scbranch.module import BranchedDiffusionModule
    from scbranch.module._extension import Placement, extend_module

    tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    module = BranchedDiffusionModule(
        4, tree.to_dict(), width=16, architecture=architecture, gaussian_skip=gaussian_skip
    )
    module.to("meta")
    extend_module(module, "D", Placement(sibling=2, t=0.2, crossover=np.zeros(3)))
    tensors = dict(module.named_buffers()) | dict(module.named_parameters())
    assert {name for name, x in tensors.items() if x.device.type != "meta"} == set()


def _joined(model, new: str) -> tuple[list[str], float]:
    """The types of the branch a new type's leaf hangs from, and its branch time."""
    tree = model.tree
    leaf = tree.branches[tree.leaf(tree.classes.index(new))]
    parent = tree.branches[leaf.parent]
    return sorted(tree.classes[c] for c in parent.classes if tree.classes[c] != new), leaf.t_end


def test_joins_places_a_type_where_the_user_says(caplog):
    # the crossover rule puts c3 next to c2 (the simulated tree's true sibling); a user who
    # knows better names a type, a time, or a group of a given hierarchy
    sim = _sim(n_per_class=20, depth=3)  # (((c0, c1), (c2, c3)), ((c4, c5), (c6, c7)))
    old = _without(sim, ["c3", "c5", "c6"])
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key=REP)
    groups = {"left": ["c0", "c1", "c2"], "right": ["c4", "c7"]}
    model = sb.BranchedDiffusion(old, hierarchy=groups, **FAST)
    model.train(max_epochs=2, enable_progress_bar=False)
    right = model.tree.branches[model.tree.node("right")]
    window = (right.t_start, right.t_end)
    with caplog.at_level("INFO", logger="scbranch"):
        model.add_classes(
            sim,
            labels=["c3", "c5", "c6"],
            joins={"c3": "c0", "c5": ("c2", 0.45), "c6": "right"},
            max_epochs=1,
            progress_bar=False,
        )
    c3, c5, c6 = model.extensions_
    # a type: joins it at its crossover time against it
    assert (c3["joins"], c3["placed_by"]) == ("c0", "c0")
    assert c3["t"] == pytest.approx(max(c3["crossover"], 0.02))
    assert _joined(model, "c3")[1] == pytest.approx(c3["t"])
    # a type and a time: exactly there
    assert (c5["joins"], c5["t"], c5["placed_by"]) == ("c2", 0.45, "c2")
    assert model.tree.branch_time(model.tree.classes.index("c5"), 2) == pytest.approx(0.45)
    # a group: a child of its branch, inside it, and a member of the group
    types, t = _joined(model, "c6")
    assert types == ["c4", "c7"] and window[0] < t < window[1] and c6["placed_by"] == "right"
    assert "c6" in [model.tree.classes[c] for c in model.tree.expand("right")]
    # c6 crosses c7 (0.44) far below the group's short branch (0.88-0.90): moved, and said
    assert c6["crossover"] < window[0] and "outside the group's branch" in caplog.text
    # the record reaches generated cells' uns
    record = model.generate(5, labels=["c5"], seed=0, progress_bar=False).uns["scbranch"]
    assert list(record["model"]["extensions"]["placed_by"]) == ["c0", "c2", "right"]


@pytest.mark.parametrize(
    "joins, error, match",
    [
        (["c0"], TypeError, "must map new types"),
        ({"c9": "c0"}, KeyError, "not among the types added"),
        ({"c7": "Myeloid"}, KeyError, "neither a cell type"),
        ({"c7": ("c0", 1.0)}, ValueError, "number in \\(0, 1\\)"),
        ({"c7": ("c0", True)}, ValueError, "number in \\(0, 1\\)"),
        ({"c7": ("c0", 0.3, 0.1)}, TypeError, "\\(name, branch time\\)"),
        ({"c7": ("left", 0.99)}, ValueError, "spans branch times"),
    ],
)
def test_joins_bad_input_is_refused_before_anything_changes(joins, error, match):
    sim = _sim(n_per_class=20, depth=3)
    model = _model(_without(sim, ["c6", "c7"]), max_epochs=1)
    model.tree.name_node("left", ["c0", "c1"])  # a clade the user named
    classes, newick = list(model.classes), model.tree.to_newick()
    with pytest.raises(error, match=match):  # c6 comes first: c7's request fails before it
        model.add_classes(sim, labels=["c6", "c7"], joins=joins, max_epochs=1, progress_bar=False)
    assert model.classes == classes and model.tree.to_newick() == newick


def test_joins_may_name_a_type_added_earlier_in_the_same_call():
    sim = _sim(n_per_class=20)
    old = _without(sim, ["c2", "c3"])
    model = _model(old, max_epochs=1)
    model.add_classes(
        sim, labels=["c2", "c3"], joins={"c3": "c2"}, max_epochs=1, progress_bar=False
    )
    assert [(e["label"], e["joins"], e["placed_by"]) for e in model.extensions_] == [
        ("c2", model.extensions_[0]["joins"], "crossover"),
        ("c3", "c2", "c2"),
    ]
    # a type added after it is not known yet when it is placed
    later = _model(_without(sim, ["c2", "c3"]), max_epochs=1)
    with pytest.raises(KeyError, match="neither a cell type"):
        later.add_classes(sim, labels=["c3", "c2"], joins={"c3": "c2"}, progress_bar=False)
    assert later.classes == ["c0", "c1"]
