"""Head evaluation: today's per-head loop against heads stored stacked and run as one bmm.

The branched network evaluates each needed head on its slice of the batch (METHOD.md §6). With
~19 heads of 3 blocks each, a training step at batch 64 launches well over a thousand small
kernels; on a GPU the step is then bound by launch overhead, not arithmetic (benchmarks/
gpu_check.py measured 47 ms per step on an H200, against 45 ms on 2 CPU cores). This script
measures what storing the heads' weights stacked ([n_heads, out, in]) would buy: the rows are
grouped by head into a padded [n_present, max_rows, width] block and every layer runs as ONE
batched matmul over the present heads only (still no head evaluated for rows that do not use
it). It checks that both give the same output and gradients, then times forward + backward.

This is a measurement for a design decision, not library code: the stacked layout would change
the saved-model format and how class extension freezes old heads.

Usage:  python benchmarks/head_batching.py [--device cuda] [--batch-sizes 64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def stacked_parameters(net) -> dict[str, torch.Tensor]:
    """The heads' weights copied into stacked leaf tensors (what a stacked layout would store)."""
    heads = net.heads
    n_blocks = len(heads[0].blocks)
    out = {}
    for b in range(n_blocks):
        for layer in ("norm", "fc1", "time", "fc2"):
            for kind in ("weight", "bias"):
                key = f"{b}.{layer}.{kind}"
                out[key] = torch.stack(
                    [getattr(getattr(h.blocks[b], layer), kind).detach() for h in heads]
                ).requires_grad_()
    out["out.weight"] = torch.stack([h.out.weight.detach() for h in heads]).requires_grad_()
    out["out.bias"] = torch.stack([h.out.bias.detach() for h in heads]).requires_grad_()
    out["n_blocks"] = n_blocks
    return out


def stacked_heads(params, h: torch.Tensor, temb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """All rows' head outputs with one batched matmul per layer over the heads present."""
    counts = torch.bincount(head, minlength=params["out.bias"].shape[0])
    present = torch.nonzero(counts).squeeze(1)  # heads used by this batch only
    # all heads present: use the stacked weights as they are (indexing would copy them)
    take = slice(None) if len(present) == len(counts) else present
    order = torch.argsort(head, stable=True)
    slot = torch.empty_like(head)
    slot[present] = torch.arange(len(present), device=head.device)
    group = slot[head[order]]  # padded group of each sorted row
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(head), device=head.device) - starts[head[order]]
    max_rows = int(counts.max())
    width = h.shape[1]

    def pad(x):
        p = x.new_zeros(len(present), max_rows, x.shape[1])
        p[group, pos] = x[order]
        return p

    hp, tp = pad(h), pad(temb)
    for b in range(params["n_blocks"]):

        def w(name, b=b):
            return params[f"{b}.{name}"][take]

        z = (
            nn.functional.layer_norm(hp, (width,)) * w("norm.weight")[:, None]
            + w("norm.bias")[:, None]
        )
        z = torch.baddbmm(w("fc1.bias")[:, None], z, w("fc1.weight").transpose(1, 2))
        z = z + torch.baddbmm(w("time.bias")[:, None], tp, w("time.weight").transpose(1, 2))
        z = nn.functional.silu(z)
        hp = hp + torch.baddbmm(w("fc2.bias")[:, None], z, w("fc2.weight").transpose(1, 2))
    ow, ob = params["out.weight"][take], params["out.bias"][take]
    yp = torch.baddbmm(ob[:, None], nn.functional.silu(hp), ow.transpose(1, 2))
    out = torch.empty(len(head), yp.shape[2], dtype=yp.dtype, device=yp.device)
    out[order] = yp[group, pos]
    return out


def loop_step(net, h, temb, head):
    """Forward + backward through the heads as ScoreNetwork.forward evaluates them today."""
    hh = h.clone().requires_grad_()
    order = torch.argsort(head, stable=True)
    counts = torch.bincount(head, minlength=len(net.heads)).tolist()
    h_sorted, t_sorted = hh[order], temb[order]
    out_sorted = torch.empty(len(head), net.n_input, device=h.device)
    start = 0
    for head_id, count in enumerate(counts):
        if count:
            sl = slice(start, start + count)
            out_sorted[sl] = net.heads[head_id](h_sorted[sl], t_sorted[sl])
            start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    out.pow(2).mean().backward()
    return out, hh.grad


def stacked_step(params, h, temb, head):
    """Forward + backward through the same heads stored stacked."""
    hh = h.clone().requires_grad_()
    out = stacked_heads(params, hh, temb, head)
    out.pow(2).mean().backward()
    return out, hh.grad


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn, device, repeats):
    for _ in range(3):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    from scbranch.module._networks import ScoreNetwork

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--n-heads", type=int, default=19, help="19 = pbmc68k's 10-class tree")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    net = ScoreNetwork(30, n_heads=args.n_heads, width=256).to(dev)
    for head in net.heads:  # non-zero outputs, so the check compares something
        nn.init.normal_(head.out.weight, std=0.02)
    params = {
        k: (v.to(dev).detach().requires_grad_() if torch.is_tensor(v) else v)
        for k, v in stacked_parameters(net).items()
    }
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        h = torch.randn(batch, 256, device=dev)
        temb = torch.randn(batch, 128, device=dev)
        head = torch.randint(0, args.n_heads, (batch,), device=dev)

        def run_loop(h=h, temb=temb, head=head):
            return loop_step(net, h, temb, head)

        def run_stacked(h=h, temb=temb, head=head):
            return stacked_step(params, h, temb, head)

        out_a, grad_a = run_loop()
        out_b, grad_b = run_stacked()
        loop_ms = time_it(run_loop, dev, args.repeats)
        stacked_ms = time_it(run_stacked, dev, args.repeats)
        rows.append(
            {
                "batch": batch,
                "heads_present": int(torch.unique(head).numel()),
                "max_abs_diff_output": float((out_a - out_b).detach().abs().max()),
                "max_abs_diff_input_grad": float((grad_a - grad_b).abs().max()),
                "loop_ms": round(loop_ms, 2),
                "stacked_ms": round(stacked_ms, 2),
                "speedup": round(loop_ms / stacked_ms, 2),
            }
        )
        print(rows[-1], flush=True)
    print(json.dumps({"device": dev, "n_heads": args.n_heads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
