"""Head evaluation: the per-head loop against the stacked heads (one bmm per layer).

The branched network evaluates each needed head on its slice of the batch (METHOD.md §6). With
~19 heads of 3 blocks each, a training step at batch 64 launches well over a thousand small
kernels; on a GPU the step is then bound by launch overhead, not arithmetic. Training on CUDA
therefore uses ``ScoreNetwork._stacked_heads``: the rows are grouped by head into a padded
[heads present, most rows, width] block and every layer runs as ONE batched matmul over the
present heads, with weights stacked from the heads' parameters on the fly. This script times
forward + backward of the library's two head paths (``_looped_heads``, ``_stacked_heads``) on
the same trunk features after checking that they agree in output and input gradient.

The known answer comes first: both paths compute the same function (output and input gradient
within 1e-4; it exits 1 and says so otherwise, and no timing is read).

Usage:  python benchmarks/head_batching.py [--device cuda] [--batch-sizes 64,256,1024]
        python benchmarks/head_batching.py --fast   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def head_step(net, stacked: bool, h, temb, head):
    """Forward + backward through the heads alone, by either of the library's two paths."""
    hh = h.clone().requires_grad_()
    if stacked:
        out = net._stacked_heads(hh, temb, head)
    else:
        out = net._looped_heads(hh, temb, head, shared_time=False)
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


#: largest difference, output or input gradient, between the two head paths (float32 sums in
#: another order differ by about 1e-6 here)
AGREEMENT = 1e-4


def main(argv=None) -> int:
    from scbranch.module._networks import ScoreNetwork

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--n-heads", type=int, default=19, help="19 = pbmc68k's 10-class tree")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--fast", action="store_true", help="smoke test: 5 heads, batches of 16 and 64, 2 repeats"
    )
    args = parser.parse_args(argv)
    if args.fast:
        args.batch_sizes, args.n_heads, args.repeats = "16,64", 5, 2
    dev = args.device
    torch.manual_seed(0)
    net = ScoreNetwork(30, n_heads=args.n_heads, width=256).to(dev)
    for head in net.heads:  # non-zero outputs, so the check compares something
        nn.init.normal_(head.out.weight, std=0.02)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        h = torch.randn(batch, 256, device=dev)
        temb = torch.randn(batch, 128, device=dev)
        head = torch.randint(0, args.n_heads, (batch,), device=dev)

        def run_loop(h=h, temb=temb, head=head):
            return head_step(net, False, h, temb, head)

        def run_stacked(h=h, temb=temb, head=head):
            return head_step(net, True, h, temb, head)

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
    # the known answer: both paths compute the same function; timings of paths that disagree
    # compare nothing
    worst = max(max(r["max_abs_diff_output"], r["max_abs_diff_input_grad"]) for r in rows)
    held = worst <= AGREEMENT
    print(
        f"known answer, the two head paths agree (max |difference| {worst:.2e} <= {AGREEMENT:g}): "
        + ("held" if held else "MISSES: read no timing")
    )
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
