"""The branch-conditioned network: one network, a branch embedding, the tree's guarantees kept."""

import numpy as np
import pytest
import torch

import scbranch as sb
from scbranch.module import BranchedDiffusionModule, BranchTree, ScoreNetwork
from scbranch.module._extension import Placement, extend_module
from scbranch.module._networks import count_parameters

FOUR = BranchTree.from_merges(
    ["A", "B", "C", "D"], [((0,), (1,), 0.3), ((2,), (3,), 0.4), ((0, 1), (2, 3), 0.7)]
)


def _random(module):
    """Random non-zero weights everywhere (output layers start at zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.net.parameters():
            p.normal_(0, 0.1)
    return module


def test_conditioned_network_is_one_network_whose_size_does_not_grow_with_types():
    net = ScoreNetwork(6, 1, width=32, n_head_blocks=2, time_dim=16, n_branches=5)
    assert len(net.heads) == 1 and net.n_branch_functions == 5
    many = ScoreNetwork(6, 1, width=32, n_head_blocks=2, time_dim=16, n_branches=119)
    per_branch = 16 + 2 * 32 * 3 + 6  # embedding, FiLM of 3 blocks, output bias
    assert count_parameters(many) - count_parameters(net) == (119 - 5) * per_branch
    with pytest.raises(ValueError, match="one head"):
        ScoreNetwork(6, 3, n_branches=5)


def test_same_branch_same_function_other_branch_other_function():
    module = _random(BranchedDiffusionModule(3, FOUR.to_dict(), architecture="conditioned"))
    x = torch.randn(8, 3)
    t_shared, t_own = torch.full((8,), 0.8), torch.full((8,), 0.1)
    a, b = torch.zeros(8, dtype=torch.long), torch.full((8,), 3)
    eps = lambda lab, t: module.predict_eps(x, t, module.branch_of(lab, t), lab)  # noqa: E731
    # above the root split A and D are on one branch: the same prediction, bit for bit
    torch.testing.assert_close(eps(a, t_shared), eps(b, t_shared), rtol=0, atol=0)
    # below it they are not
    assert (eps(a, t_own) - eps(b, t_own)).abs().amax(1).min() > 1e-3
    # a scalar time (the sampler's) gives what per-row times give
    one = module.predict_eps(x, torch.tensor(0.1), module.branch_of(a, t_own), a)
    torch.testing.assert_close(one, eps(a, t_own), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", ["heun", "em"])
def test_fan_out_shares_the_path_above_branch_points(solver):
    """Rows of types on one branch are evaluated once there: fewer row evaluations."""
    module = _random(BranchedDiffusionModule(3, FOUR.to_dict(), architecture="conditioned"))
    counts = {0: 5, 1: 5, 2: 5, 3: 5}
    shared = module.sample_cells(counts, solver=solver, n_steps=20, seed=2, share=True)
    alone = module.sample_cells(counts, solver=solver, n_steps=20, seed=2, share=False)
    assert shared.n_row_evaluations < alone.n_row_evaluations
    assert torch.isfinite(shared.x).all() and shared.x.shape == alone.x.shape


def _gaussian_eps(x, t, sde, mean, var):
    """E[eps | x_t] for x_0 ~ N(mean, var I) (exact)."""
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    return sigma * (x - alpha * mean) / (alpha**2 * var + sigma**2)


@pytest.mark.parametrize("architecture", ["branched", "conditioned"])
def test_trained_network_learns_each_types_true_noise(architecture):
    """Known answer: two Gaussian types; below their branch point each branch's prediction is
    the exact E[eps | x_t] of its own Gaussian."""
    torch.manual_seed(0)
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    module = BranchedDiffusionModule(
        2, tree.to_dict(), architecture=architecture, width=64, n_head_blocks=1, time_dim=32
    )
    gen = torch.Generator().manual_seed(0)
    means, sd = torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), 0.5
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    for _ in range(1500):
        labels = torch.randint(0, 2, (256,), generator=gen)
        x = means[labels] + sd * torch.randn(256, 2, generator=gen)
        _, _, out = module({"X": x, "labels": labels[:, None].float()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    module.eval()
    errors = []
    with torch.no_grad():
        for c in (0, 1):
            n = 4000
            t = torch.rand(n, generator=gen) * 0.4 + 0.05  # below the branch point at 0.5
            x0 = means[c] + sd * torch.randn(n, 2, generator=gen)
            xt, _ = module.sde.marginal(x0, t, torch.randn(n, 2, generator=gen))
            lab = torch.full((n,), c)
            eps = module.predict_eps(xt, t, module.branch_of(lab, t), lab)
            true = _gaussian_eps(xt, t, module.sde, means[c], sd**2)
            errors.append(float(((eps - true) ** 2).sum() / (true**2).sum()))
    print(f"\n{architecture}: relative squared error of E[eps | x_t] per type {errors}")
    assert max(errors) < 0.02


SAMPLING = {"solver": "heun", "n_steps": 30, "seed": 3}
OLD_COUNTS = {0: 5, 1: 4, 3: 6}


def _extended(own_head: bool | str):
    """A random conditioned module, its old types' samples, extended by a type joining A."""
    module = _random(
        BranchedDiffusionModule(4, FOUR.to_dict(), architecture="conditioned", width=16)
    )
    before = module.sample_cells(OLD_COUNTS, **SAMPLING).x
    n_params = count_parameters(module.net)
    placement = Placement(sibling=0, t=0.5, crossover=np.zeros(4))
    leaf, head = extend_module(module, "N1", placement, own_head=own_head)
    return module, before, n_params, leaf, head


@pytest.mark.parametrize("own_head", [False, True, "readout"])
def test_extension_adds_an_embedding_row_and_changes_nothing_old(own_head):
    module, before, n_params, _, head = _extended(own_head)
    net = module.net
    assert net.n_branch_functions == 8 and head == 7
    assert list(net.branch_heads) == ([str(head)] if own_head is True else [])
    assert list(net.branch_readouts) == ([str(head)] if own_head == "readout" else [])
    per_branch = net.branch_embed.embedding_dim + net.branch_adapter.embedding_dim
    own = {False: 0, True: net.heads[0], "readout": net.heads[0].out}[own_head]
    own = count_parameters(own) if own else 0
    assert count_parameters(net) == n_params + per_branch + own
    after = module.sample_cells(OLD_COUNTS, **SAMPLING).x
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("own_head", ["blocks", "readout"])
def test_a_branch_with_its_own_head_parts_routes_only_its_rows_there(own_head):
    """Class extension's ``own_head``: the new branch's rows go through head blocks (or an
    output layer) of its own; every old branch keeps its function bit for bit, in mixed
    batches too, and the parts survive a state-dict round trip into a network built from the
    tree alone."""
    module, _, _, leaf, head = _extended(own_head=own_head)
    net = module.net
    parts = net.branch_heads if own_head == "blocks" else net.branch_readouts
    # a mixed batch (old branches, the new one, in any order) gives each row what it gives alone
    x, t = torch.randn(12, 4), torch.full((12,), 0.2)
    labels = torch.tensor([4, 0, 4, 1, 3, 4, 2, 0, 4, 3, 1, 4])
    branch = module.branch_of(labels, t)
    assert (branch == leaf).sum() == 5  # branch ids; the network maps them to functions
    with torch.no_grad():
        mixed = module.predict_eps(x, t, branch, labels)
        alone = torch.cat([module.predict_eps(x[i : i + 1], t[i : i + 1], branch[i : i + 1],
                                              labels[i : i + 1]) for i in range(12)])  # fmt: skip
        torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
        # the own blocks are what the new rows use, and only they
        for p in parts[str(head)].parameters():
            p.add_(0.05)
        moved = module.predict_eps(x, t, branch, labels)
    new = branch == leaf
    torch.testing.assert_close(moved[~new], mixed[~new], rtol=0, atol=0)
    assert (moved[new] - mixed[new]).abs().amax(1).min() > 1e-4
    # saved weights load into a network built from the extended tree (as BranchedDiffusion.load)
    fresh = BranchedDiffusionModule(4, module.tree.to_dict(), architecture="conditioned", width=16)
    fresh.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_eps(x, t, branch, labels), moved, rtol=0, atol=0)
    # a second type joining the first new one starts from ITS parts, not the shared ones
    _, second = extend_module(module, "N2", Placement(4, 0.1, np.zeros(5)), own_head=own_head)
    for a, b in zip(net.head_of(second).parameters(), net.head_of(head).parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(net.readout_of(second).weight, net.readout_of(head).weight)
    # asked for the other kind, a third type still starts as its source's function
    other = "readout" if own_head == "blocks" else "blocks"
    _, third = extend_module(module, "N3", Placement(4, 0.05, np.zeros(6)), own_head=other)
    with torch.no_grad():
        source = module.net(x, t, torch.full((12,), head), labels)
        start = module.net(x, t, torch.full((12,), third), labels)
    torch.testing.assert_close(start, source, rtol=0, atol=0)


def _tree_data():
    return sb.datasets.simulate_tree(depth=2, n_per_class=80, dim=8, seed=0).to_anndata()


def test_conditioned_model_extension_save_load_and_hybrids(tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    sim = _tree_data()
    old = sim[sim.obs["cell_type"] != "c3"].copy()
    old.obs["cell_type"] = old.obs["cell_type"].cat.remove_unused_categories()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(old, architecture="conditioned", width=64, n_head_blocks=2)
    model.train(max_epochs=60, enable_progress_bar=False)
    classes = list(model.classes)
    before = model.generate(n_cells=30, labels=classes, seed=1, progress_bar=False)
    net = model.module.net
    weights = [net.branch_embed.weight.detach().clone(), net.branch_adapter.weight.detach().clone()]
    # the new branch learns through its embedding and adapter alone (from a zero adapter):
    # it needs more steps than a new head, which starts as a copy of a trained head
    model.add_classes(sim, labels=["c3"], max_epochs=300, progress_bar=False)
    assert model.extensions_[-1]["joins"] == "c2"  # the simulated tree's true sibling
    # old rows untouched; the new ones trained away from their start
    grown = [net.branch_embed.weight, net.branch_adapter.weight]
    for old_rows, new in zip(weights, grown, strict=True):
        new = new.detach()
        torch.testing.assert_close(new[: len(old_rows)], old_rows, rtol=0, atol=0)
        assert not any(torch.equal(new[-1], row) for row in old_rows)
    assert all(p.requires_grad for p in model.module.parameters())
    after = model.generate(n_cells=30, labels=classes, seed=1, progress_bar=False)
    np.testing.assert_array_equal(after.obsm["X_latent"], before.obsm["X_latent"])
    # generated cells of every type, the new one included, look like their type
    knn = KNeighborsClassifier(5).fit(sim.obsm["X_latent"], sim.obs["cell_type"].astype(str))
    gen = model.generate(n_cells=100, seed=0, progress_bar=False)
    hits = knn.predict(gen.obsm["X_latent"]) == gen.obs["cell_type"].astype(str).to_numpy()
    assert hits.mean() > 0.8, hits.mean()
    # persistence: the architecture and the grown embedding come back
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    assert loaded.module.architecture == "conditioned"
    again = loaded.generate(n_cells=30, labels=classes, seed=1, progress_bar=False)
    np.testing.assert_array_equal(again.obsm["X_latent"], before.obsm["X_latent"])
    # the tree's interpretations work on it
    hy = loaded.hybrids("c0", "c1", n_cells=10, progress_bar=False)
    assert hy.n_obs == 20


def test_conditioned_is_the_default_and_models_saved_before_load_as_heads(tmp_path):
    from _legacy import save_without_option

    sim = sb.datasets.simulate_tree(depth=1, n_per_class=20, dim=4, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    assert sb.BranchedDiffusion(sim, width=16, n_head_blocks=1).module.architecture == (
        "conditioned"
    )
    heads = sb.BranchedDiffusion(sim, width=16, n_head_blocks=1, architecture="branched")
    # a model saved when one head per branch was the only network: no architecture recorded
    save_without_option(heads, tmp_path / "old", "architecture")
    loaded = sb.BranchedDiffusion.load(tmp_path / "old")
    assert loaded.module.architecture == "branched"
    before = heads.generate(n_cells=3, seed=0, progress_bar=False)
    after = loaded.generate(n_cells=3, seed=0, progress_bar=False)
    np.testing.assert_array_equal(before.obsm["X_latent"], after.obsm["X_latent"])
