"""Train one model on N devices with Lightning's DDP and record what every process did.

    python benchmarks/ddp_train.py --devices 2 --out DIR [--accelerator gpu] [--global-batch 48]

Every process writes ``DIR/devices{N}_rank{r}.npz`` (its per-step losses, final weights and
the fit's wall time); process 0 saves the model to ``DIR/model{N}``. Comparing the files of
``--devices 1`` and ``--devices N`` shows whether N devices train what one device trains with
the same global batch (``tests/test_ddp.py`` on two CPU processes, ``gpu_check.py --sections
multi`` on GPUs). Lightning's DDP launcher re-runs this script in every process, which is why
it is a script and not a function.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class StepLosses(Callback):
    """This process's training loss at every step."""

    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--global-batch", type=int, default=48)
    parser.add_argument("--n-per-class", type=int, default=90)
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import scvi

    import scbranch as sb

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    sim = sb.datasets.simulate_tree(
        depth=args.depth, n_per_class=args.n_per_class, dim=args.dim, seed=1
    )
    adata = sim.to_anndata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    torch.manual_seed(0)
    model = sb.BranchedDiffusion(adata, width=args.width, n_head_blocks=1)
    losses = StepLosses()
    n = args.devices
    start = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.global_batch // n,
        class_balance=0.5,
        accelerator=args.accelerator,
        devices=n,
        strategy="ddp_find_unused_parameters_true" if n > 1 else "auto",
        loader="blocks",
        datasplitter_kwargs={"block_rows": 50, "blocks_per_buffer": 3},
        enable_progress_bar=False,
        callbacks=[losses],
    )
    seconds = time.perf_counter() - start
    rank = model.trainer.global_rank
    state = {k: v.detach().cpu().numpy() for k, v in model.module.state_dict().items()}
    np.savez(
        f"{args.out}/devices{n}_rank{rank}.npz",
        losses=np.array(losses.values),
        seconds=np.array(seconds),
        **state,
    )
    model.save(f"{args.out}/model{n}")  # only process 0 writes


if __name__ == "__main__":
    main()
