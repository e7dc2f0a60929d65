"""Score networks: one function per branch of the tree, or one per class (docs/method.md).

All variants predict the noise ``eps`` of ``x_t = alpha x_0 + sigma eps``:

* branched: no label input; the head is chosen by the branch of (class, t). Only the heads the
  batch needs are evaluated, each on a contiguous slice of the rows sorted by head.
* conditioned (the model's default): one network for all branches; the branch of (class, t)
  picks an embedding that is added to the time embedding, so every block is conditioned on it.
  Same branch, same function (fan-out sampling holds), with parameters that do not grow with
  the number of types trained on (a type added by class extension may bring head blocks of
  its own).
* flat ("label-guided" baseline): a class embedding is added to the input and one head serves all.

LayerNorm, not BatchNorm: running statistics drift, break train/eval agreement and would break
the frozen-branch guarantee of class extension.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

#: Devices on which training evaluates the heads with batched matmuls (``_stacked_heads``):
#: there kernel launches, not arithmetic, bound a step. On CPUs the per-head loop is faster,
#: so it stays the default there (docs/benchmarks/gpu.md).
STACKED_HEAD_DEVICES: tuple[str, ...] = ("cuda",)


class FourierTimeEmbedding(nn.Module):
    """Fixed random Fourier features of ``t`` followed by a small MLP."""

    def __init__(self, dim: int, n_frequencies: int = 32, scale: float = 8.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(n_frequencies, generator=gen) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * n_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # noqa: D102
        arg = 2 * math.pi * t.view(-1, 1) * self.freqs
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block with additive time conditioning."""

    def __init__(self, width: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(time_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, film: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One block; ``film`` (rows x 2 width) scales (1 + first half) and shifts the hidden."""
        z = self.fc1(self.norm(h)) + self.time(temb)
        if film is not None:
            gamma, beta = film.chunk(2, dim=-1)
            z = z * (1 + gamma) + beta
        return h + self.fc2(nn.functional.silu(z))


class Head(nn.Module):
    """Branch-specific blocks and the output layer.

    No LayerNorm before the output: it would discard the norm of the residual stream, and the
    noise prediction must scale with its input. The output layer starts at zero, so an untrained
    head predicts the analytic Gaussian part (see ``BranchedDiffusionModule.predict_eps``).
    """

    def __init__(self, width: int, time_dim: int, n_blocks: int, n_output: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(width, time_dim) for _ in range(n_blocks))
        self.out = nn.Linear(width, n_output)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, films: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The blocks (each with its FiLM of ``films``, if given) and the output layer."""
        return self.out(self.features(h, temb, films))

    def features(
        self, h: torch.Tensor, temb: torch.Tensor, films: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """What the output layer reads: the blocks' activated hidden units."""
        for k, block in enumerate(self.blocks):
            h = block(h, temb, None if films is None else films[k])
        return nn.functional.silu(h)


class ScoreNetwork(nn.Module):
    """Noise predictor with a shared trunk and ``n_heads`` heads.

    Parameters
    ----------
    n_input
        Dimension of the data.
    n_heads
        Number of heads (branches for the branched model, 1 for the flat model).
    width
        Hidden width.
    n_trunk_blocks
        Residual blocks shared by all heads.
    n_head_blocks
        Residual blocks in every head.
    n_classes
        If > 0, a class embedding is added to the input (flat, label-guided model).
    time_dim
        Width of the time embedding.
    n_branches
        If > 0 (with ``n_heads=1``), ``head`` indexes one of ``n_branches`` branches, each with
        an embedding added to the time embedding and a small adapter: a scale and shift of
        every block's hidden units (FiLM) and an output bias (branch-conditioned network).
        :meth:`add_branch` may give a new branch head blocks of its own (``branch_heads``) or
        an output layer of its own on the shared blocks (``branch_readouts``).

    Examples
    --------
    >>> net = ScoreNetwork(8, n_heads=3, width=32)
    >>> eps = net(torch.randn(5, 8), torch.rand(5), torch.tensor([0, 2, 2, 1, 0]))
    >>> eps.shape
    torch.Size([5, 8])
    """

    def __init__(
        self,
        n_input: int,
        n_heads: int,
        width: int = 256,
        n_trunk_blocks: int = 1,
        n_head_blocks: int = 3,
        n_classes: int = 0,
        time_dim: int = 128,
        n_branches: int = 0,
    ):
        super().__init__()
        if n_branches > 0 and n_heads != 1:
            raise ValueError("A branch-conditioned network has one head (n_heads=1).")
        self.n_input = n_input
        self.time_embed = FourierTimeEmbedding(time_dim)
        self.inp = nn.Linear(n_input, width)
        self.class_embed = nn.Embedding(n_classes, width) if n_classes > 0 else None
        self.trunk = nn.ModuleList(ResidualBlock(width, time_dim) for _ in range(n_trunk_blocks))
        self.heads = nn.ModuleList(
            Head(width, time_dim, n_head_blocks, n_input) for _ in range(n_heads)
        )
        # Added to the time embedding, as class labels are in conditional diffusion models: it
        # reaches every block through the blocks' time projections, not the input alone.
        self.branch_embed = nn.Embedding(n_branches, time_dim) if n_branches > 0 else None
        # Per-branch adapter (FiLM of every block, output bias), zero at the start: it gives a
        # new type's branch (class extension, where nothing shared may change) the capacity
        # that an embedding alone lacks.
        self.n_blocks = n_trunk_blocks + n_head_blocks
        self.branch_adapter = None
        if n_branches > 0:
            self.branch_adapter = nn.Embedding(n_branches, 2 * width * self.n_blocks + n_input)
            nn.init.zeros_(self.branch_adapter.weight)
        # Head blocks of a branch's own, keyed by branch id: added by class extension only (a
        # type the shared head cannot describe through its embedding and adapter rows, as
        # one outside the fitted latent); empty for a trained network, so nothing changes there.
        self.branch_heads = nn.ModuleDict() if n_branches > 0 else None
        # Or only an output layer of a branch's own, reading the shared blocks: most of what
        # own blocks give a type outside the latent, at width x n_input parameters
        # (docs/benchmarks/extension_outside.md).
        self.branch_readouts = nn.ModuleDict() if n_branches > 0 else None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        head: torch.Tensor,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of ``x`` at times ``t`` with head ``head[i]`` for row ``i``."""
        # One time for all rows (sampling): embed it once and broadcast, instead of running the
        # time MLP and every block's time projection on n identical rows.
        shared_time = t.dim() == 0 or t.numel() == 1
        temb = self.time_embed(t.reshape(1) if shared_time else t)
        h = self.inp(x)
        if self.class_embed is not None:
            if label is None:
                raise ValueError("This network is label-guided: pass `label`.")
            h = h + self.class_embed(label)
        if self.branch_embed is not None:
            return self._conditioned(h, temb, head)
        for block in self.trunk:
            h = block(h, temb)
        if len(self.heads) == 1:
            return self.heads[0](h, temb)
        if self.training and torch.is_grad_enabled() and h.device.type in STACKED_HEAD_DEVICES:
            return self._stacked_heads(
                h, temb if not shared_time else temb.expand(len(h), -1), head
            )
        return self._looped_heads(h, temb, head, shared_time)

    def _conditioned(self, h: torch.Tensor, temb: torch.Tensor, branch: torch.Tensor):
        """Every block conditioned on the branch: embedding + FiLM; the branch's output bias."""
        temb = temb + self.branch_embed(branch)  # one conditioning row per row of x
        adapter = self.branch_adapter(branch)
        width = self.inp.out_features
        films = list(adapter[:, : 2 * width * self.n_blocks].split(2 * width, dim=1))
        for k, block in enumerate(self.trunk):
            h = block(h, temb, films[k])
        out = self._routed_head(h, temb, films[len(self.trunk) :], branch)
        return out + adapter[:, 2 * width * self.n_blocks :]

    def _routed_head(self, h, temb, films, branch) -> torch.Tensor:
        """Each row through the head of its branch.

        Its own head blocks, or the shared blocks read by its own output layer or the shared one.
        """
        own, readouts = {}, {}
        if self.branch_heads or self.branch_readouts:  # only extended networks pay the lookup
            present = [str(b) for b in branch.unique().tolist()]
            own = {int(b): self.branch_heads[b] for b in present if b in self.branch_heads}
            readouts = {
                int(b): self.branch_readouts[b] for b in present if b in self.branch_readouts
            }
        if not own and not readouts:
            return self.heads[0](h, temb, films)
        out = torch.empty(len(h), self.n_input, dtype=h.dtype, device=h.device)
        shared = torch.ones(len(h), dtype=torch.bool, device=h.device)
        for b, head in own.items():
            rows = branch == b
            shared &= ~rows
            out[rows] = head(h[rows], temb[rows], [f[rows] for f in films])
        if shared.any():
            feats = self.heads[0].features(h[shared], temb[shared], [f[shared] for f in films])
            y = self.heads[0].out(feats)
            for b, readout in readouts.items():
                rows = branch[shared] == b
                y[rows] = readout(feats[rows])
            out[shared] = y
        return out

    @property
    def n_branch_functions(self) -> int:
        """How many branch functions there are (heads, or branch embeddings when conditioned)."""
        return len(self.heads) if self.branch_embed is None else self.branch_embed.num_embeddings

    def add_branch(self, source: int, own_head: bool | str = False) -> int:
        """A new branch function, starting as a copy of ``source``'s; its index.

        A new head (branched) or a new row of the branch embedding and adapter (conditioned).
        ``own_head`` (conditioned): ``True`` or ``"blocks"`` also gives it head blocks of its
        own, a copy of those ``source`` uses (with ``source``'s output layer);
        ``"readout"`` an output layer of its own on the shared blocks, a copy of
        ``source``'s (head blocks, if ``source`` has its own: the new function must start
        as ``source``'s). Nothing else changes.
        """
        if self.branch_embed is None:
            self.heads.append(copy.deepcopy(self.heads[source]))
            return len(self.heads) - 1
        self.branch_embed = _with_row_copied(self.branch_embed, source)
        self.branch_adapter = _with_row_copied(self.branch_adapter, source)
        index = self.branch_embed.num_embeddings - 1
        if own_head == "readout" and str(source) not in self.branch_heads:
            self.branch_readouts[str(index)] = copy.deepcopy(self.readout_of(source))
        elif own_head:
            head = copy.deepcopy(self.head_of(source))
            head.out = copy.deepcopy(self.readout_of(source))
            self.branch_heads[str(index)] = head
        return index

    def head_of(self, branch: int) -> nn.Module:
        """The head blocks branch function ``branch`` uses."""
        if self.branch_embed is None:
            return self.heads[branch]
        return self.branch_heads[str(branch)] if str(branch) in self.branch_heads else self.heads[0]

    def readout_of(self, branch: int) -> nn.Linear:
        """The output layer branch function ``branch`` uses."""
        if self.branch_embed is not None and str(branch) in self.branch_readouts:
            return self.branch_readouts[str(branch)]
        return self.head_of(branch).out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a conditioned network saved after extension holds head blocks or output layers of
        # some branches: make them before the children load (torch loads this module first)
        if self.branch_heads is not None:
            for kind, template in (("heads", self.heads[0]), ("readouts", self.heads[0].out)):
                made = getattr(self, f"branch_{kind}")
                mark = f"{prefix}branch_{kind}."
                ids = {k[len(mark) :].split(".", 1)[0] for k in state_dict if k.startswith(mark)}
                for key in sorted(ids - set(made), key=int):
                    made[key] = copy.deepcopy(template)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def branch_parameters(
        self, branches: list[int]
    ) -> tuple[list[nn.Parameter], torch.Tensor | None, list[nn.Parameter]]:
        """Parameters to train for ``branches`` alone: ``(rows, mask, own)``.

        Branched: no row matrices; ``own`` the heads' parameters. Conditioned: ``rows`` the
        branch embedding and adapter matrices, ``mask`` the rows of ``branches`` (only those
        may change: the caller masks the gradient and restores the other rows, see
        ``module/_extension.py``) and ``own`` the parameters of the head blocks and output
        layers of their own that some of ``branches`` have.
        """
        ids = sorted(set(int(b) for b in branches))
        if self.branch_embed is None:
            return [], None, [p for h in ids for p in self.heads[h].parameters()]
        mask = torch.zeros(self.branch_embed.num_embeddings, dtype=torch.bool)
        mask[ids] = True
        rows = [self.branch_embed.weight, self.branch_adapter.weight]
        own = [
            p
            for b in ids
            for parts in (self.branch_heads, self.branch_readouts)
            if str(b) in parts
            for p in parts[str(b)].parameters()
        ]
        return rows, mask.to(rows[0].device), own

    def _looped_heads(
        self, h: torch.Tensor, temb: torch.Tensor, head: torch.Tensor, shared_time: bool
    ) -> torch.Tensor:
        """The heads of all rows, each needed head once on the contiguous slice of its rows."""
        shape = (len(h), self.n_input)
        # The sampler already passes rows grouped by branch: then no gather/scatter is needed.
        ids, counts = torch.unique_consecutive(head, return_counts=True)
        ids, counts = ids.tolist(), counts.tolist()
        if len(set(ids)) == len(ids):
            out = torch.empty(shape, dtype=h.dtype, device=h.device)
            start = 0
            for head_id, count in zip(ids, counts, strict=True):
                sl = slice(start, start + count)
                out[sl] = self.heads[head_id](h[sl], temb if shared_time else temb[sl])
                start += count
            return out
        order = torch.argsort(head, stable=True)
        counts = torch.bincount(head, minlength=len(self.heads)).tolist()
        h_sorted = h[order]
        temb_sorted = temb if shared_time else temb[order]
        out_sorted = torch.empty(shape, dtype=h.dtype, device=h.device)
        start = 0
        for head_id, count in enumerate(counts):
            if count:
                sl = slice(start, start + count)
                t_sl = temb_sorted if shared_time else temb_sorted[sl]
                out_sorted[sl] = self.heads[head_id](h_sorted[sl], t_sl)
                start += count
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out

    def _stacked_heads(self, h: torch.Tensor, temb: torch.Tensor, head: torch.Tensor):
        """The heads of all rows with ONE batched matmul per layer over the heads present.

        Training on a GPU with the per-head loop launches over a thousand small kernels per step
        (19 heads x 3 blocks, forward and backward), so a step is launch-bound whatever the
        batch size. Here the rows are padded into one [heads present, most rows, width] block
        and every layer runs once for all present heads (measured in docs/benchmarks/gpu.md;
        ``benchmarks/head_batching.py`` times the two head paths alone). The weights are stacked
        from the heads' own parameters on the fly, so the saved format and the freezing of heads
        (class extension) are unchanged: gradients reach each head's parameters through
        ``torch.stack``, frozen ones get none.
        Still only the heads the batch needs are evaluated, on the rows that need them.
        """
        n_heads = len(self.heads)
        counts = torch.bincount(head, minlength=n_heads)
        counts_list = counts.tolist()  # the one host sync, as in the loop
        present = [i for i, c in enumerate(counts_list) if c]
        heads = [self.heads[i] for i in present]
        slot = torch.zeros(n_heads, dtype=torch.long, device=head.device)
        slot[present] = torch.arange(len(present), device=head.device)
        order = torch.argsort(head, stable=True)
        sorted_head = head[order]
        group = slot[sorted_head]  # padded block of each sorted row
        pos = (
            torch.arange(len(head), device=head.device)
            - (torch.cumsum(counts, 0) - counts)[sorted_head]
        )
        shape = (len(present), max(counts_list))

        def pad(x: torch.Tensor) -> torch.Tensor:
            p = x.new_zeros(*shape, x.shape[1])
            p[group, pos] = x[order]
            return p

        def stack(layers: list[nn.Module], kind: str) -> torch.Tensor:
            return torch.stack([getattr(layer, kind) for layer in layers])

        def linear(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
            w, b = stack(layers, "weight"), stack(layers, "bias")
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

        hp, tp = pad(h), pad(temb)
        for k in range(len(heads[0].blocks)):
            blocks = [hd.blocks[k] for hd in heads]
            norms = [bl.norm for bl in blocks]
            z = nn.functional.layer_norm(hp, norms[0].normalized_shape, eps=norms[0].eps)
            z = z * stack(norms, "weight").unsqueeze(1) + stack(norms, "bias").unsqueeze(1)
            z = linear(z, [bl.fc1 for bl in blocks]) + linear(tp, [bl.time for bl in blocks])
            hp = hp + linear(nn.functional.silu(z), [bl.fc2 for bl in blocks])
        yp = linear(nn.functional.silu(hp), [hd.out for hd in heads])
        out = torch.empty(len(head), yp.shape[2], dtype=yp.dtype, device=yp.device)
        out[order] = yp[group, pos]
        return out


def _with_row_copied(embedding: nn.Embedding, source: int) -> nn.Embedding:
    """``embedding`` with one more row, a copy of row ``source``."""
    old = embedding.weight
    with torch.no_grad():
        weight = torch.cat([old, old[source : source + 1]])
    grown = nn.Embedding(len(weight), weight.shape[1], device=old.device, dtype=old.dtype)
    grown.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    return grown


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def flat_width_matching(
    n_input: int,
    n_classes: int,
    target_params: int,
    n_blocks: int,
    time_dim: int = 128,
) -> int:
    """Width (a multiple of 8) of a flat network whose parameter count is closest to a target."""

    def n_params(w: int) -> int:
        blocks = n_blocks * (2 * w * w + 2 * w + time_dim * w + w + 2 * w)
        return (
            blocks
            + (n_input + 1) * w  # input layer
            + n_classes * w  # class embedding
            + 2 * w
            + (w + 1) * n_input  # head norm and output
            + (64 + 1) * time_dim
            + (time_dim + 1) * time_dim  # time MLP
        )

    widths = range(8, 8192, 8)
    return min(widths, key=lambda w: abs(n_params(w) - target_params))
