import time

import numpy as np
import pytest
import torch

from scbranch.module import BranchedDiffusionModule, BranchTree, ScoreNetwork
from scbranch.module._networks import count_parameters, flat_width_matching

FOUR = BranchTree.from_merges(
    ["A", "B", "C", "D"], [((0,), (1,), 0.3), ((2,), (3,), 0.4), ((0, 1), (2, 3), 0.7)]
)


def _net(**kw):
    torch.manual_seed(0)
    defaults = dict(n_input=6, n_heads=5, width=32, n_trunk_blocks=1, n_head_blocks=2, time_dim=16)
    defaults.update(kw)
    net = ScoreNetwork(**defaults).eval()
    # output layers start at zero (an untrained head predicts only the analytic Gaussian part);
    # randomise them so that comparisons between heads and rows are not trivially equal
    with torch.no_grad():
        for head in net.heads:
            head.out.weight.normal_(0, 0.3)
            head.out.bias.normal_(0, 0.3)
    return net


def test_grouped_heads_equal_rowwise_evaluation():
    net = _net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen)
    t = torch.rand(40, generator=gen)
    head = torch.randint(0, 5, (40,), generator=gen)
    out = net(x, t, head)
    rows = torch.cat([net(x[i : i + 1], t[i : i + 1], head[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(out, rows, atol=1e-5, rtol=0)
    # and with each head applied explicitly to the trunk features
    temb = net.time_embed(t)
    h = net.inp(x)
    for block in net.trunk:
        h = block(h, temb)
    manual = torch.stack(
        [net.heads[int(k)](h[i : i + 1], temb[i : i + 1])[0] for i, k in enumerate(head)]
    )
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)
    # the head matters: another assignment gives other outputs for the rows that changed
    other = (head + 1) % 5
    assert (net(x, t, other) - out).abs().amax(1).min() > 1e-4


def test_scalar_time_is_broadcast():
    net = _net()
    x = torch.randn(7, 6)
    head = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    torch.testing.assert_close(
        net(x, torch.tensor(0.3), head), net(x, torch.full((7,), 0.3), head), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        net(x, torch.tensor([0.3]), head), net(x, torch.full((7,), 0.3), head), atol=1e-6, rtol=0
    )


def test_rows_grouped_by_head_take_the_direct_path():
    """Runs of heads in any order (as the sampler passes them) give the same as row by row."""
    net = _net()
    x = torch.randn(9, 6)
    head = torch.tensor([3, 3, 3, 0, 0, 4, 1, 1, 1])
    for t in (torch.tensor(0.7), torch.full((9,), 0.7)):
        out = net(x, t, head)
        rows = torch.cat([net(x[i : i + 1], torch.tensor(0.7), head[i : i + 1]) for i in range(9)])
        torch.testing.assert_close(out, rows, atol=1e-5, rtol=0)


def test_unneeded_heads_are_never_called():
    net = _net()
    calls = {i: [] for i in range(5)}
    for i, h in enumerate(net.heads):
        h.register_forward_hook(lambda mod, inp, out, i=i: calls[i].append(inp[0].shape[0]))
    head = torch.tensor([0, 2, 2, 0, 2, 2])
    net(torch.randn(6, 6), torch.rand(6), head)
    assert calls == {0: [2], 1: [], 2: [4], 3: [], 4: []}


def _loss_and_head_grads(net, x, t, head):
    net.zero_grad(set_to_none=True)
    out = net(x, t, head)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_stacked_heads_equal_the_per_head_loop_in_output_and_gradients(monkeypatch):
    """The GPU training path (one bmm per layer) computes what the per-head loop computes."""
    net = _net().train()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(33, 6, generator=gen), torch.rand(33, generator=gen)
    head = torch.tensor([0, 2, 2, 4] * 8 + [0])  # heads 1 and 3 absent, uneven groups
    loop_out, loop_grads = _loss_and_head_grads(net, x, t, head)
    monkeypatch.setattr("scbranch.module._networks.STACKED_HEAD_DEVICES", ("cpu",))
    calls = []
    original = ScoreNetwork._stacked_heads
    monkeypatch.setattr(
        ScoreNetwork, "_stacked_heads", lambda self, *a: calls.append(1) or original(self, *a)
    )
    out, grads = _loss_and_head_grads(net, x, t, head)
    assert calls == [1]  # training with gradients on a listed device takes the stacked path
    torch.testing.assert_close(out, loop_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == loop_grads.keys()
    assert not any(k.startswith(("heads.1.", "heads.3.")) for k in grads)  # absent: no grad
    for k in grads:
        torch.testing.assert_close(grads[k], loop_grads[k], atol=1e-4, rtol=1e-4)
    # edge cases: one head present, a single row
    for rows in (torch.tensor([3, 3, 3]), torch.tensor([1])):
        n = len(rows)
        monkeypatch.setattr("scbranch.module._networks.STACKED_HEAD_DEVICES", ())
        expected, _ = _loss_and_head_grads(net, x[:n], t[:n], rows)
        monkeypatch.setattr("scbranch.module._networks.STACKED_HEAD_DEVICES", ("cpu",))
        got, _ = _loss_and_head_grads(net, x[:n], t[:n], rows)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # evaluation (sampling) keeps the loop, so samples never depend on the training path
    calls.clear()
    net.eval()
    with torch.no_grad():
        net(x, t, head)
    assert calls == []


def test_stacked_heads_leave_frozen_heads_without_gradients(monkeypatch):
    """Class extension freezes old heads: the stacked path must not give them gradients."""
    monkeypatch.setattr("scbranch.module._networks.STACKED_HEAD_DEVICES", ("cpu",))
    net = _net().train()
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.heads[4].parameters():
        p.requires_grad_(True)
    head = torch.tensor([0, 4, 4, 2, 4, 0])
    _, grads = _loss_and_head_grads(net, torch.randn(6, 6), torch.rand(6), head)
    assert grads and all(k.startswith("heads.4.") for k in grads)


def test_flat_network_requires_label_and_uses_it():
    net = _net(n_heads=1, n_classes=3)
    assert isinstance(net.class_embed, torch.nn.Embedding)
    assert net.class_embed.num_embeddings == 3 and net.class_embed.embedding_dim == 32
    assert _net().class_embed is None
    x, t = torch.randn(4, 6), torch.rand(4)
    with pytest.raises(ValueError, match="label"):
        net(x, t, torch.zeros(4, dtype=torch.long))
    a = net(x, t, torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 0]))
    b = net(x, t, torch.zeros(4, dtype=torch.long), torch.tensor([1, 1, 0, 0]))
    assert (a - b).abs().amax(1)[[0, 2]].min() > 1e-4  # changed labels change the output
    torch.testing.assert_close(a[[1, 3]], b[[1, 3]])  # unchanged labels do not


def test_flat_width_matches_parameter_count():
    for n_input, width, trunk, head_blocks in [(10, 64, 1, 3), (30, 128, 2, 1), (5, 48, 1, 2)]:
        kw = dict(width=width, n_trunk_blocks=trunk, n_head_blocks=head_blocks, time_dim=32)
        module_b = BranchedDiffusionModule(n_input, FOUR.to_dict(), architecture="branched", **kw)
        module_f = BranchedDiffusionModule(n_input, FOUR.to_dict(), architecture="flat", **kw)
        nb, nf = count_parameters(module_b.net), count_parameters(module_f.net)
        assert abs(nf - nb) / nb < 0.05, (nb, nf)
        assert len(module_f.net.heads) == 1 and module_f.net.class_embed.num_embeddings == 4
        assert len(module_b.net.heads) == 7 and module_b.net.class_embed is None
        # the width is the best multiple of 8: its neighbours are not closer to the target
        w = module_f.net.inp.out_features
        assert w % 8 == 0
        assert w == flat_width_matching(n_input, 4, nb, trunk + head_blocks, time_dim=32)

        def n_flat(width_, n_input=n_input, trunk=trunk, head_blocks=head_blocks):
            net = ScoreNetwork(n_input, 1, width_, trunk, head_blocks, n_classes=4, time_dim=32)
            return count_parameters(net)

        assert nf == n_flat(w)
        assert abs(n_flat(w) - nb) <= abs(n_flat(w - 8) - nb)
        assert abs(n_flat(w) - nb) <= abs(n_flat(w + 8) - nb)
    with pytest.raises(ValueError, match="architecture"):
        BranchedDiffusionModule(3, FOUR.to_dict(), architecture="tree")


def _module(**kw):
    torch.manual_seed(0)
    return BranchedDiffusionModule(3, FOUR.to_dict(), width=32, n_head_blocks=1, time_dim=16, **kw)


def test_inference_generative_loss():
    module = _module()
    shift, scale = np.array([1.0, -2.0, 0.5]), 3.0
    module.set_standardization(shift, scale)
    n = 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen) * 3 + torch.tensor([1.0, -2.0, 0.5])
    labels = torch.randint(0, 4, (n, 1), generator=gen).float()
    tensors = {"X": x, "labels": labels}
    inf = module.inference(**module._get_inference_input(tensors))
    t = inf["t"]
    assert t.shape == (n,) and float(t.min()) >= module.sde.t_min and float(t.max()) <= 1.0
    # stratified: exactly one time in each of the n strata of [t_min, 1]
    u = (t - module.sde.t_min) / (1 - module.sde.t_min)
    assert sorted((u * n).floor().long().tolist()) == list(range(n))
    x0 = (x - torch.as_tensor(shift, dtype=torch.float32)) / scale
    expected = module.sde.alpha(t)[:, None] * x0 + module.sde.sigma(t)[:, None] * inf["noise"]
    torch.testing.assert_close(inf["xt"], expected)
    gen_out = module.generative(**module._get_generative_input(tensors, inf))
    assert gen_out["eps"].shape == (n, 3)
    loss = module.loss(tensors, inf, gen_out)
    assert loss.loss.dim() == 0 and torch.isfinite(loss.loss)
    expected_loss = (gen_out["eps"] - inf["noise"]).pow(2).mean()
    torch.testing.assert_close(loss.loss, expected_loss)
    # generative picks the head of branch(label, t)
    branch = FOUR.lookup(inf["labels"], t)
    sigma, alpha = module.sde.sigma(t)[:, None], module.sde.alpha(t)[:, None]
    skip = sigma * inf["xt"] / (alpha**2 * module.data_var + sigma**2)
    direct = skip + module.net(inf["xt"], t, branch)
    torch.testing.assert_close(gen_out["eps"], direct)
    # the scvi forward runs the same chain
    _, _, losses = module(tensors)
    assert torch.isfinite(losses.loss)
    # standardisation round trip
    torch.testing.assert_close(module.unstandardize(module.standardize(x)), x, atol=1e-5, rtol=0)


def test_branch_of_equals_tree_lookup():
    module = _module()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2000,), generator=gen)
    t = torch.rand(2000, generator=gen)
    t[:300] = torch.tensor([0.0, 0.3, 0.4, 0.7, 1.0])[torch.randint(0, 5, (300,), generator=gen)]
    got = module.branch_of(labels, t)
    torch.testing.assert_close(got, FOUR.lookup(labels, t), rtol=0, atol=0)
    # numpy lookup in float64 agrees away from the float32-rounded boundaries
    np.testing.assert_array_equal(
        got[300:].numpy(), FOUR.lookup(labels[300:].numpy(), t[300:].numpy())
    )
    # exact boundaries: a branch holds [t_start, t_end), the root includes t = 1
    lab = torch.tensor([0, 0, 0, 0, 2, 2, 3, 1])
    tt = torch.tensor([0.0, 0.3, 0.7, 1.0, 0.4, 0.39, 0.7, 0.2999])
    assert module.branch_of(lab, tt).tolist() == [0, 4, 6, 6, 5, 2, 6, 1]
    np.testing.assert_array_equal(
        module.branch_of(labels, torch.tensor(0.5)).numpy(), FOUR.lookup(labels.numpy(), 0.5)
    )


def test_flat_module_sampling_ignores_share():
    module = _module(architecture="flat")
    a = module.sample_cells({0: 4, 2: 3}, n_steps=6, share=True, seed=3)
    b = module.sample_cells({0: 4, 2: 3}, n_steps=6, share=False, seed=3)
    assert torch.equal(a.x, b.x) and a.n_row_evaluations == b.n_row_evaluations
    module.set_standardization(np.array([10.0, 0, 0]), 2.0)
    c = module.sample_cells({0: 4, 2: 3}, n_steps=6, share=True, seed=3)
    torch.testing.assert_close(c.x, a.x * 2 + torch.tensor([10.0, 0, 0]))


@pytest.mark.parametrize("seed", [0])
def test_training_reduces_loss(seed):
    torch.manual_seed(seed)
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    module = BranchedDiffusionModule(
        2, tree.to_dict(), width=64, n_trunk_blocks=1, n_head_blocks=1, time_dim=32
    )
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[2.0, 0.0], [-2.0, 1.0]])
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(300):
        labels = torch.randint(0, 2, (256,), generator=gen)
        x = means[labels] + 0.3 * torch.randn(256, 2, generator=gen)
        _, _, out = module({"X": x, "labels": labels[:, None].float()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    first, last = np.mean(losses[:50]), np.mean(losses[-50:])
    elapsed = time.perf_counter() - start
    print(f"\ntraining: first 50 {first:.3f}, last 50 {last:.3f}, {elapsed:.1f} s")
    assert last < 0.7 * first


def test_untrained_module_predicts_the_gaussian_noise():
    """Zero-initialised heads + the sigma(t) x skip: exact eps for standard Gaussian data."""
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    module = BranchedDiffusionModule(3, tree.to_dict(), width=16)
    sde = module.sde
    x0 = torch.randn(20000, 3)
    t = torch.full((20000,), 0.3)
    xt, noise = sde.marginal(x0, t)
    labels = torch.zeros(20000, dtype=torch.long)
    eps = module.predict_eps(xt, t, module.branch_of(labels, t), labels)
    np.testing.assert_allclose(
        eps.detach().numpy(), (sde.sigma(t)[:, None] * xt).numpy(), atol=1e-6
    )
    # and sigma * x_t is E[eps | x_t] for N(0, I) data: its regression on the true noise is ~1
    slope = float((eps * noise).sum() / (eps * eps).sum())
    assert abs(slope - 1.0) < 0.03
