"""Training batches read in blocks of contiguous cells, shuffled across blocks, on 1 or N devices.

Why not scvi-tools' loader or another package: scvi-tools' ``AnnDataLoader`` reads every
minibatch as scattered rows, which on a file-backed matrix costs about as much as reading
thousands of contiguous rows (``scbranch/io/_rows.py``: 64 scattered rows of a 2,000-gene
backed .h5ad in 18 ms, 4,096 contiguous ones in 15 ms); anndata's ``AnnLoader`` reads the same
way; annbatch, the scverse block-shuffling loader this design follows, needs Python >= 3.12
(scbranch supports 3.11). So the loader here reads a few random blocks of contiguous cells
into a buffer, shuffles the buffer and cuts minibatches from it: each epoch still visits
every cell once (class balance aside) in an order that mixes cells from many parts of the
file.

Several devices (DDP): every process walks the SAME buffers and global batches
(``batch_size`` rows per process, ``batch_size x world_size`` per step) and keeps its own
slice of each, so each process trains on its own part of every epoch. The forward noise and
diffusion times of a step are drawn for the whole global batch from a key the loader gives
(``noise_key``), each process taking its rows: a step on two devices computes exactly the
gradient of the same step on one device with the global batch, and training does not depend
on the number of devices (up to float rounding; ``tests/test_ddp.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from .._constants import NOISE_KEYS, REGISTRY_KEYS
from ..io._rows import RowMatrix, is_on_disk, is_streamed
from ._data import balanced_indices

logger = logging.getLogger(__name__)

#: contiguous cells per block read from disk
BLOCK_ROWS = 512
#: blocks per shuffle buffer (a buffer mixes cells of this many random places of the file)
BLOCKS_PER_BUFFER = 32


def _key(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (independent streams per part)."""
    state = np.random.SeedSequence([int(seed) % 2**32, *map(int, parts)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def _take(buffer, rows: np.ndarray) -> np.ndarray:
    block = buffer[rows]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def _stack(parts: list):
    if any(sp.issparse(p) for p in parts):
        return sp.vstack([sp.csr_matrix(p) for p in parts], format="csr")
    return np.concatenate(parts)


class BlockShuffleBatches(IterableDataset):
    """Minibatches cut from shuffled buffers of random blocks of contiguous cells.

    Parameters
    ----------
    matrix
        The training data (cells x features), in memory, on disk or a
        :class:`~scbranch.io._rows.RowMatrix` (which may transform blocks as they are read).
    fields
        Further per-cell arrays in memory (labels, batches), by registry key.
    data_key
        Registry key of ``matrix`` in the batches.
    indices
        Cells to train on (the others are skipped).
    batch_size
        Cells per process per step.
    class_labels, class_balance
        Class codes of all cells and the oversampling of rare classes (see
        :func:`~scbranch.model._data.balanced_indices`; the epoch keeps its size).
    seed
        Seed of the block order, the shuffles and the noise keys.
    rank, world_size
        This process and the number of processes.
    shuffle
        Shuffle blocks and buffers (training) or read in order (validation).
    epoch_offset
        Key of the first epoch (validation batches use another stream than training).
    block_rows, blocks_per_buffer
        Read granularity and buffer size.

    Examples
    --------
    >>> x = np.arange(20.0).reshape(10, 2)
    >>> data = BlockShuffleBatches(
    ...     x, {"labels": np.zeros((10, 1))}, data_key="X", indices=np.arange(10),
    ...     batch_size=4, block_rows=3, blocks_per_buffer=2,
    ... )  # fmt: skip
    >>> [tuple(b["X"].shape) for b in data]
    [(4, 2), (4, 2)]
    """

    def __init__(
        self,
        matrix,
        fields: Mapping[str, np.ndarray],
        *,
        data_key: str,
        indices: np.ndarray,
        batch_size: int,
        class_labels: np.ndarray | None = None,
        class_balance: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epoch_offset: int = 0,
        block_rows: int = BLOCK_ROWS,
        blocks_per_buffer: int = BLOCKS_PER_BUFFER,
    ):
        super().__init__()
        self.matrix = matrix if isinstance(matrix, RowMatrix) else RowMatrix(matrix)
        self.fields = dict(fields)
        self.data_key = data_key
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.class_labels = class_labels
        self.class_balance = float(class_balance)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = shuffle
        self.block_rows = int(block_rows)
        self.blocks_per_buffer = int(blocks_per_buffer)
        self.epoch = int(epoch_offset)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}.")
        if len(self) == 0 and len(self.indices):
            raise ValueError(
                f"{len(self.indices)} training cells are fewer than one step's batch of "
                f"{self.global_batch} ({self.batch_size} per process x {self.world_size}); "
                "lower batch_size."
            )

    @property
    def global_batch(self) -> int:
        """Cells per optimisation step over all processes."""
        return self.batch_size * self.world_size

    def _multiplicity(self, epoch: int) -> np.ndarray:
        """How often every cell appears in ``epoch`` (0 for cells not trained on)."""
        n = self.matrix.shape[0]
        if self.class_balance == 0.0 or self.class_labels is None:
            mult = np.zeros(n, dtype=np.int32)
            mult[self.indices] = 1
            return mult
        labels = np.asarray(self.class_labels).ravel()[self.indices]
        picked = balanced_indices(labels, self.class_balance, seed=_key(self.seed, 1, epoch))
        return np.bincount(self.indices[picked], minlength=n).astype(np.int32)

    def __len__(self) -> int:
        """Steps per epoch (the last incomplete global batch is dropped)."""
        return int(self._multiplicity(self.epoch).sum()) // self.global_batch

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # the next pass over the data is the next epoch
        rng = np.random.default_rng(_key(self.seed, 2, epoch))
        mult = self._multiplicity(epoch)
        n = self.matrix.shape[0]
        starts = np.arange(0, n, self.block_rows)
        starts = np.array(
            [s for s in starts if mult[s : s + self.block_rows].any()], dtype=np.int64
        )
        if self.shuffle:
            starts = rng.permutation(starts)
        g, b = self.global_batch, self.batch_size
        carry_rows, carry_data = np.zeros(0, dtype=np.int64), None
        step = 0
        for first in range(0, len(starts), self.blocks_per_buffer):
            rows, parts = [carry_rows], [] if carry_data is None else [carry_data]
            # contiguous reads, in file order within the buffer
            for start in np.sort(starts[first : first + self.blocks_per_buffer]):
                stop = min(n, start + self.block_rows)
                local = np.repeat(np.arange(stop - start), mult[start:stop])
                parts.append(self.matrix[slice(int(start), int(stop))][local])
                rows.append(start + local)
            rows = np.concatenate(rows)
            buffer = _stack(parts)
            order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
            n_full = len(rows) // g
            for k in range(n_full):
                mine = order[k * g + self.rank * b : k * g + (self.rank + 1) * b]
                yield self._batch(buffer, rows, mine, _key(self.seed, 3, epoch, step))
                step += 1
            rest = order[n_full * g :]
            carry_rows, carry_data = rows[rest], buffer[rest]
        # the last incomplete global batch is dropped: every process makes the same steps

    def _batch(self, buffer, rows, mine, key: int) -> dict[str, torch.Tensor]:
        cells = rows[mine]
        batch = {self.data_key: torch.from_numpy(_take(buffer, mine))}
        for name, values in self.fields.items():
            batch[name] = torch.as_tensor(np.asarray(values)[cells])
        batch[NOISE_KEYS.KEY] = torch.tensor([key], dtype=torch.int64)
        batch[NOISE_KEYS.OFFSET] = torch.tensor([self.rank * self.batch_size], dtype=torch.int64)
        batch[NOISE_KEYS.ROWS] = torch.tensor([self.global_batch], dtype=torch.int64)
        return batch


class BlockDataModule(LightningDataModule):
    """Lightning data module over :class:`BlockShuffleBatches` (train and validation splits).

    The split follows scvi-tools' ``DataSplitter`` (``scvi.settings.seed`` permutation);
    under DDP each process learns its rank from the trainer.

    Parameters
    ----------
    matrix, fields, data_key
        As in :class:`BlockShuffleBatches`.
    train_size, validation_size
        Fractions of cells to train and validate on.
    batch_size
        Cells per process per step.
    class_labels, class_balance
        Class oversampling of the training batches.
    seed
        Seed of the split-independent randomness (block order, shuffles, noise).
    block_rows, blocks_per_buffer
        Read granularity and buffer size.

    Examples
    --------
    >>> dm = BlockDataModule(np.zeros((100, 3)), {}, data_key="X", batch_size=10)
    >>> dm.setup(); dm.n_train, len(dm.train_dataloader())
    (100, 10)
    """

    def __init__(
        self,
        matrix,
        fields: Mapping[str, np.ndarray],
        *,
        data_key: str,
        batch_size: int,
        train_size: float = 1.0,
        validation_size: float | None = None,
        class_labels: np.ndarray | None = None,
        class_balance: float = 0.0,
        seed: int = 0,
        block_rows: int = BLOCK_ROWS,
        blocks_per_buffer: int = BLOCKS_PER_BUFFER,
    ):
        super().__init__()
        from scvi import settings
        from scvi.dataloaders._data_splitting import validate_data_split

        self.matrix, self.fields, self.data_key = matrix, dict(fields), data_key
        self.batch_size = int(batch_size)
        self.class_labels, self.class_balance = class_labels, float(class_balance)
        self.seed = int(seed)
        self.block_rows, self.blocks_per_buffer = int(block_rows), int(blocks_per_buffer)
        self.n_obs = int(matrix.shape[0])
        self.n_train, self.n_val = validate_data_split(
            self.n_obs, float(train_size), validation_size, self.batch_size, True, False
        )
        indices = np.arange(self.n_obs)
        if self.n_train < self.n_obs:
            indices = np.random.RandomState(seed=settings.seed).permutation(indices)
        self.val_idx = np.sort(indices[: self.n_val])
        self.train_idx = np.sort(indices[self.n_val : self.n_val + self.n_train])
        self.test_idx = np.sort(indices[self.n_val + self.n_train :])
        self.rank, self.world_size = 0, 1
        self._train = None
        logger.info(
            "Training batches read in blocks of %d cells%s.",
            self.block_rows,
            " from disk" if getattr(matrix, "on_disk", is_on_disk(matrix)) else "",
        )

    def setup(self, stage: str | None = None) -> None:
        """Learn this process's rank and the number of processes from the trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)

    def _dataset(self, indices, *, shuffle: bool, epoch_offset: int, balance: float):
        return BlockShuffleBatches(
            self.matrix,
            self.fields,
            data_key=self.data_key,
            indices=indices,
            batch_size=self.batch_size,
            class_labels=self.class_labels,
            class_balance=balance,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=shuffle,
            epoch_offset=epoch_offset,
            block_rows=self.block_rows,
            blocks_per_buffer=self.blocks_per_buffer,
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        # one dataset for the whole fit: it counts the epochs (each pass is a new epoch)
        if self._train is None or (self._train.rank, self._train.world_size) != (
            self.rank,
            self.world_size,
        ):
            self._train = self._dataset(
                self.train_idx, shuffle=True, epoch_offset=0, balance=self.class_balance
            )
        return DataLoader(self._train, batch_size=None)

    def val_dataloader(self):  # noqa: D102
        if not len(self.val_idx):
            return []
        # every process validates on the same batches (their losses are averaged anyway)
        data = BlockShuffleBatches(
            self.matrix,
            self.fields,
            data_key=self.data_key,
            indices=self.val_idx,
            batch_size=max(1, min(self.batch_size, len(self.val_idx))),
            seed=self.seed,
            shuffle=False,
            epoch_offset=2**20,
            block_rows=self.block_rows,
            blocks_per_buffer=self.blocks_per_buffer,
        )
        # its own generator: a pass draws a seed from it, not from torch's global stream
        return DataLoader(data, batch_size=None, generator=torch.Generator())


def steps_per_epoch(n_cells: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in an epoch of ``n_cells`` (incomplete global batches dropped).

    Examples
    --------
    >>> steps_per_epoch(1000, 64, world_size=2)
    7
    """
    return max(1, math.floor(n_cells / (batch_size * world_size)))


def use_block_loader(model, loader: str, devices, trainer_kwargs: Mapping) -> bool:
    """Whether ``model.train`` reads blocks of cells (its ``loader`` argument, resolved)."""
    if loader not in ("auto", "blocks", "scvi"):
        raise ValueError(f"loader must be 'auto', 'blocks' or 'scvi', got {loader!r}.")
    streamed = is_streamed(model.space.training_matrix(model.adata))
    if loader == "scvi" and streamed:
        raise ValueError(
            "The training data are on disk or normalised on the way in (target_sum), which "
            "only loader='blocks' reads; drop `loader=` or use 'blocks'."
        )
    several = several_devices(devices, trainer_kwargs.get("strategy", ""))
    if loader == "scvi" and several:
        # its class-balanced loader has no distributed sampler: every process would train on
        # the same batches
        raise ValueError(
            "loader='scvi' cannot split batches between several devices; drop `loader=` "
            "(several devices read blocks, each process its own share of every batch)."
        )
    if loader != "auto":
        return loader == "blocks"
    return streamed or several


def several_devices(devices, strategy) -> bool:
    """Whether Lightning's ``devices`` (int, list or string) and ``strategy`` ask for several.

    Examples
    --------
    >>> several_devices("0,1", ""), several_devices("2", ""), several_devices(1, "auto")
    (True, True, False)
    """
    if "ddp" in str(strategy).lower():  # a name, or a DDPStrategy object
        return True
    if isinstance(devices, str) and devices.strip() not in ("", "auto"):
        text = devices.strip()
        if "," in text:  # device indices, as Lightning reads "0,1" (or "1," for one)
            return len([i for i in text.split(",") if i.strip()]) > 1
        try:
            devices = int(text)
        except ValueError:
            return False
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices > 1 or devices == -1
    return isinstance(devices, list | tuple) and len(devices) > 1


def ddp_processes(devices, accelerator, trainer_kwargs: Mapping) -> int:
    """How many processes share each step under DDP (1 without a DDP ``strategy``).

    ``train()``'s ``devices`` (Lightning's forms) on ``accelerator``, times ``num_nodes``.

    Examples
    --------
    >>> ddp_processes("0,1", "gpu", {"strategy": "ddp"}), ddp_processes(4, "gpu", {})
    (2, 1)
    """
    if "ddp" not in str(trainer_kwargs.get("strategy", "")).lower():  # a name or DDPStrategy
        return 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:  # device indices: "0,1" (or "1,")
        count = len([i for i in devices.split(",") if i.strip()])
    elif isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        count = devices
    elif "cpu" in str(accelerator).lower():  # "auto" or -1 on the CPU: Lightning runs one
        count = 1
    else:  # "auto" or -1: every visible GPU
        count = torch.cuda.device_count()
    return max(1, count) * max(1, int(trainer_kwargs.get("num_nodes", 1)))


def model_datamodule(
    model,
    devices,
    accelerator,
    *,
    batch_size: int,
    train_size: float,
    validation_size: float | None,
    class_balance: float,
    trainer_kwargs: dict,
    **loader_kwargs,
) -> BlockDataModule:
    """The block loader over a model's training data (its space's matrix and labels).

    ``devices`` and ``accelerator`` are ``train()``'s. Its seed is scvi-tools' global seed,
    which scvi-tools' own loader uses too.
    """
    import scvi

    labels = model.get_from_registry(model.adata, REGISTRY_KEYS.LABELS_KEY)
    # Lightning warns when an epoch is shorter than its logging interval; incomplete global
    # batches are dropped here, and under DDP each process takes its share of every step
    per_step = batch_size * ddp_processes(devices, accelerator, trainer_kwargs)
    full = max(1, math.floor(model.adata.n_obs * train_size / per_step))
    trainer_kwargs["log_every_n_steps"] = min(trainer_kwargs.get("log_every_n_steps", 50), full)
    return BlockDataModule(
        model.space.training_matrix(model.adata),
        {REGISTRY_KEYS.LABELS_KEY: labels},
        data_key=model.module.data_key,
        batch_size=batch_size,
        train_size=train_size,
        validation_size=validation_size,
        class_labels=labels,
        class_balance=class_balance,
        seed=int(scvi.settings.seed or 0),
        **loader_kwargs,
    )
