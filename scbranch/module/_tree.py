"""The branch tree: which score head serves which classes over which diffusion times.

A tree over C classes has 2C - 1 branches. Branch ``b`` is a triple (classes, t_start, t_end):
for every class ``c`` in ``b.classes`` and every ``t_start <= t < t_end`` the reverse process of
``c`` follows the score of branch ``b``. Leaves start at 0, the root ends at 1, and every class
sits on exactly one branch at every time.

Branch ids are stable and meaningful: in a discovered tree leaves come first, in class order
(leaf id == class index), then internal branches in the order they were formed, the root last.
Classes added later (:meth:`BranchTree.add_class`) append their branches, so existing ids never
change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

_NEWICK_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class Branch:
    """One branch of the tree (one score head over one time interval).

    ``trained`` holds the classes whose cells trained the branch's head over the interval: all
    of ``classes``, unless a class was added later (:meth:`BranchTree.add_class`) and passes
    through the branch without having trained its head.

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> tree.branches[0].length, tree.branches[2].classes
    (0.5, (0, 1))
    """

    id: int
    classes: tuple[int, ...]
    t_start: float
    t_end: float
    parent: int = -1
    children: tuple[int, ...] = field(default_factory=tuple)
    head: int = -1
    # the classes whose cells trained the branch's head over this interval (None: all of
    # `classes`); a class added later (BranchTree.add_class) passes through the branches
    # above its branch point without having trained their heads
    trained: tuple[int, ...] | None = None

    @property
    def length(self) -> float:
        """Length of the branch in units of diffusion time."""
        return self.t_end - self.t_start

    @property
    def is_leaf(self) -> bool:
        """Whether the branch ends at t = 0 with a single class."""
        return len(self.children) == 0


def lookup_tables(starts: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, t) -> torch.Tensor:
    """Branch ids from per-class tables of branch start times and ids (see ``BranchTree``).

    ``starts[c]`` holds the start times of class ``c``'s branches from leaf to root (padded with
    +inf), ``ids[c]`` their ids; the branch at time ``t`` is the last one starting at or before it.
    """
    t = torch.as_tensor(t, dtype=starts.dtype, device=labels.device).expand(labels.shape)
    level = (t.unsqueeze(-1) >= starts[labels]).sum(-1).clamp_min(1) - 1
    return ids[labels, level]


class BranchTree:
    """A hierarchy of branches over classes, with vectorised branch lookup.

    Parameters
    ----------
    classes
        Class names; their order defines class indices.
    branches
        Branches with ``id == position``; ``parent``/``children`` must be consistent.

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    >>> tree.to_newick()
    '(C:0.6,(A:0.3,B:0.3):0.3);'
    >>> tree.lookup(np.array([0, 0, 2]), np.array([0.1, 0.5, 0.9])).tolist()
    [0, 3, 4]
    """

    def __init__(self, classes: Sequence[str], branches: Sequence[Branch]):
        self.classes = [str(c) for c in classes]
        self.branches = list(branches)
        #: named nodes (groups of a given hierarchy, clades a user named): name -> branch id
        self.node_names: dict[str, int] = {}
        for i, b in enumerate(self.branches):
            if b.id != i:
                raise ValueError(f"Branch at position {i} has id {b.id}; ids must be positions.")
            if b.head < 0:
                b.head = b.id
            if b.trained is None:
                b.trained = b.classes
        self.validate()
        self._build_lookup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_merges(
        cls,
        classes: Sequence[str],
        merges: Sequence[tuple[Sequence[int], Sequence[int], float]],
    ) -> BranchTree:
        """Build a tree from agglomeration steps.

        Parameters
        ----------
        classes
            Class names.
        merges
            ``C - 1`` triples ``(classes_a, classes_b, time)``: the two sets merged and the time of
            the merge, in the order they happened. Times must increase along every path to the root.

        Returns
        -------
        The tree.
        """
        n = len(classes)
        if len(merges) != n - 1:
            raise ValueError(
                f"A binary tree over {n} classes needs {n - 1} merges, got {len(merges)}."
            )
        branches = [Branch(id=i, classes=(i,), t_start=0.0, t_end=1.0) for i in range(n)]
        top = {i: i for i in range(n)}  # class -> id of the highest branch holding it so far
        for set_a, set_b, time in merges:
            unknown = [c for c in (*set_a, *set_b) if c not in top]
            if unknown:
                raise ValueError(
                    f"Merge of {set_a} and {set_b} names class indices {unknown} "
                    f"outside 0..{n - 1}."
                )
            ids = {top[c] for c in set_a} | {top[c] for c in set_b}
            if (
                len({top[c] for c in set_a}) != 1
                or len({top[c] for c in set_b}) != 1
                or len(ids) != 2
            ):
                raise ValueError(
                    f"Merge of {set_a} and {set_b} does not join two existing subtrees."
                )
            a, b = sorted(ids)
            new_id = len(branches)
            members = tuple(sorted(branches[a].classes + branches[b].classes))
            for child in (a, b):
                if time < branches[child].t_start:
                    raise ValueError(
                        f"Merge time {time} lies below its child's start {branches[child].t_start}."
                    )
                branches[child].t_end = float(time)
                branches[child].parent = new_id
            branches.append(
                Branch(id=new_id, classes=members, t_start=float(time), t_end=1.0, children=(a, b))
            )
            for c in members:
                top[c] = new_id
        return cls(classes, branches)

    # ------------------------------------------------------------------ structure
    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def n_branches(self) -> int:
        """Number of branches (2C - 1 for a binary tree)."""
        return len(self.branches)

    @property
    def root(self) -> int:
        """Id of the root branch."""
        return next(b.id for b in self.branches if b.parent < 0)

    @property
    def n_heads(self) -> int:
        """Number of distinct score heads the branches use."""
        return max(b.head for b in self.branches) + 1

    def leaf(self, c: int) -> int:
        """Id of the leaf branch of class index ``c``."""
        return self._leaf_of[c]

    def path(self, c: int) -> list[int]:
        """Branch ids of class ``c`` from its leaf (t = 0) up to the root (t = 1)."""
        out, b = [], self._leaf_of[c]
        while b >= 0:
            out.append(b)
            b = self.branches[b].parent
        return out

    def class_index(self, labels: Sequence[str] | str) -> np.ndarray:
        """Class indices of label names; raises a clear error for unknown labels."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        pos = {c: i for i, c in enumerate(self.classes)}
        groups = [lab for lab in labels if str(lab) not in pos and str(lab) in self.node_names]
        if groups:
            inside = [self.classes[c] for c in self.branches[self.node(str(groups[0]))].classes]
            raise KeyError(
                f"{groups[0]!r} is a group of the hierarchy ({', '.join(inside)}), not a cell "
                "type; name one of its cell types here (generate also accepts groups)."
            )
        unknown = list(dict.fromkeys(str(lab) for lab in labels if str(lab) not in pos))
        if unknown:
            raise KeyError(
                f"Unknown label(s) {unknown}; the model knows {self.classes}. "
                "Check the spelling, or add new classes with `model.add_classes`."
            )
        return np.array([pos[str(lab)] for lab in labels], dtype=np.int64)

    def node(self, name: str) -> int:
        """Branch id of a named node (a group of a given hierarchy, or a named clade)."""
        if name in self.node_names:
            return self.node_names[name]
        raise KeyError(
            f"Unknown node {name!r}; the tree's named nodes are {sorted(self.node_names)} and its "
            f"cell types {self.classes}."
        )

    def expand(self, name: str) -> list[int]:
        """Class indices a name stands for: a cell type itself, or the types below a node."""
        if name in self.classes:
            return [self.classes.index(name)]
        return list(self.branches[self.node(name)].classes)

    def name_node(self, name: str, classes: Sequence[str]) -> int:
        """Name the branch that holds exactly ``classes`` (a clade); returns its id.

        Examples
        --------
        >>> tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
        >>> tree.name_node("AB", ["A", "B"])
        3
        """
        name = str(name)
        if name in self.classes:
            raise ValueError(f"{name!r} is a cell type; give the node another name.")
        members = tuple(sorted(int(i) for i in self.class_index(list(classes))))
        # the upper part of a split branch keeps the original id: name the highest match
        matches = [b.id for b in self.branches if b.classes == members]
        if not matches:
            raise ValueError(
                f"{list(classes)} is not a clade of the tree (no branch holds exactly these "
                f"types); the tree is {self.to_newick(3)}."
            )
        if name in self.node_names and self.node_names[name] not in matches:
            raise ValueError(f"The tree already has a node named {name!r}.")
        top = max(matches, key=lambda b: self.branches[b].t_end)
        self.node_names[name] = top
        return top

    def branch_time(self, a: int, b: int) -> float:
        """Diffusion time at which classes ``a`` and ``b`` join (their branch point)."""
        if a == b:
            return 0.0
        above_a = set(self.path(a))
        for br in self.path(b):
            if br in above_a:
                return self.branches[br].t_start
        raise RuntimeError("Classes share no branch: the tree is not connected.")

    def breakpoints(self, classes: Sequence[int] | None = None, t_min: float = 0.0) -> list[float]:
        """Times in ``(t_min, 1)`` where a class of ``classes`` (default: all) changes head.

        Every branch has its own head except the two halves of a branch split by
        :meth:`add_class`; the split point is a breakpoint for the new class only, so the
        time grid of the old classes, and with it their samples, stays exactly the same.
        """
        classes = range(self.n_classes) if classes is None else classes
        times = set()
        for c in classes:
            path = self.path(c)
            for below, above in zip(path[:-1], path[1:], strict=False):
                if self.branches[above].head != self.branches[below].head:
                    times.add(self.branches[above].t_start)
        return sorted(t for t in times if t_min < t < 1.0)

    def add_class(self, name: str, sibling: int, t: float) -> BranchTree:
        """A new tree with class ``name`` joining class ``sibling``'s path at time ``t``.

        The branch of ``sibling`` that spans ``t`` is split there (docs/method.md): its upper
        part keeps its id and head and gains the new class; the lower part gets a new id and the
        SAME head, so old classes follow exactly the same heads at every time; the new class
        gets a leaf ``(name, 0, t)`` with a new head (index ``n_heads``). Ids and heads of all
        other branches are unchanged, and so is what their heads were trained on
        (``Branch.trained``): the branches above the new class's branch point list it among
        their classes, not among the classes that trained them (:meth:`mark_trained`).

        Examples
        --------
        >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.6)])
        >>> new = tree.add_class("C", sibling=0, t=0.3)
        >>> new.to_newick(), new.n_heads
        ('((A:0.3,C:0.3):0.3,B:0.6);', 4)
        >>> new.breakpoints([0, 1]) == tree.breakpoints([0, 1])
        True
        >>> new.branches[new.root].classes, new.branches[new.root].trained
        ((0, 1, 2), (0, 1))
        """
        if name in self.classes:
            raise ValueError(f"The tree already has a class {name!r}.")
        if not 0.0 < t < 1.0:
            raise ValueError(f"The branch point must lie in (0, 1), got {t}.")
        branches = [
            Branch(b.id, b.classes, b.t_start, b.t_end, b.parent, b.children, b.head, b.trained)
            for b in self.branches
        ]
        new = self.n_classes
        split = next(
            branches[b] for b in self.path(sibling) if branches[b].t_start <= t < branches[b].t_end
        )
        if t - split.t_start < 1e-9:
            raise ValueError(
                f"t={t} is the start of a branch already; place the class slightly above it."
            )
        lower = Branch(
            id=len(branches),
            classes=split.classes,
            t_start=split.t_start,
            t_end=t,
            parent=split.id,
            children=split.children,
            head=split.head,
            trained=split.trained,
        )
        leaf = Branch(
            id=len(branches) + 1,
            classes=(new,),
            t_start=0.0,
            t_end=t,
            parent=split.id,
            head=self.n_heads,
        )
        for ch in split.children:
            branches[ch].parent = lower.id
        split.t_start = t
        split.children = (lower.id, leaf.id)
        b = split
        while b is not None:
            b.classes = tuple(sorted((*b.classes, new)))
            b = branches[b.parent] if b.parent >= 0 else None
        tree = BranchTree([*self.classes, str(name)], [*branches, lower, leaf])
        # a named group now holds the new class too: names stay on the upper parts (same ids)
        tree.node_names = dict(self.node_names)
        return tree

    @property
    def trained_together(self) -> tuple[int, ...]:
        """The classes the whole network was trained on together (the root head's).

        Examples
        --------
        >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.6)]).add_class("C", 0, 0.3)
        >>> tree.trained_together
        (0, 1)
        """
        return self.branches[self.root].trained

    def mark_trained(self, branches: Sequence[int] | None = None) -> None:
        """Record that the heads of ``branches`` (default: all) were trained on all their classes.

        Training the whole network (``train()``) trains every head on every class that
        passes through its branch; extension trains the new class's head alone, or with
        ``fine_tune_shared`` the heads above its branch point too.

        Examples
        --------
        >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.6)]).add_class("C", 0, 0.3)
        >>> tree.mark_trained()
        >>> tree.branches[tree.root].trained
        (0, 1, 2)
        """
        for b in range(self.n_branches) if branches is None else branches:
            self.branches[b].trained = self.branches[b].classes

    def validate(self) -> None:
        """Check that every class sits on exactly one branch at every time in [0, 1]."""
        n = len(self.classes)
        leaves = [b for b in self.branches if not b.children]
        if sorted(c for b in leaves for c in b.classes) != list(range(n)):
            raise ValueError("Every class needs exactly one leaf branch.")
        roots = [b for b in self.branches if b.parent < 0]
        if len(roots) != 1 or roots[0].t_end != 1.0 or len(roots[0].classes) != n:
            raise ValueError(
                "The tree needs one root branch that holds every class and ends at t = 1."
            )
        self._leaf_of = {}
        for b in leaves:
            if b.t_start != 0.0:
                raise ValueError(f"Leaf branch {b.id} must start at t = 0, starts at {b.t_start}.")
            self._leaf_of[b.classes[0]] = b.id
        for b in self.branches:
            if b.t_end < b.t_start:
                raise ValueError(f"Branch {b.id} ends ({b.t_end}) before it starts ({b.t_start}).")
            if not b.trained or not set(b.trained) <= set(b.classes):
                raise ValueError(
                    f"Branch {b.id}'s head was trained on classes {list(b.trained or ())}, "
                    f"not a non-empty part of its classes {list(b.classes)}."
                )
            if b.children:
                union = sorted(c for ch in b.children for c in self.branches[ch].classes)
                if union != sorted(b.classes):
                    raise ValueError(f"Branch {b.id} does not hold exactly its children's classes.")
                for ch in b.children:
                    child = self.branches[ch]
                    if child.parent != b.id or child.t_end != b.t_start:
                        raise ValueError(
                            f"Branch {ch} must end where its parent {b.id} starts ({b.t_start})."
                        )

    # ------------------------------------------------------------------ lookup
    def _build_lookup(self) -> None:
        paths = [self.path(c) for c in range(self.n_classes)]
        depth = max(len(p) for p in paths)
        starts = np.full((self.n_classes, depth), np.inf)
        ids = np.full((self.n_classes, depth), -1, dtype=np.int64)
        for c, p in enumerate(paths):
            starts[c, : len(p)] = [self.branches[b].t_start for b in p]
            ids[c, : len(p)] = p
        self._starts = starts
        self._ids = ids
        self._heads = np.array([b.head for b in self.branches], dtype=np.int64)

    def lookup(self, labels, t):
        """Branch ids for a batch of (class index, time) pairs, in one vectorised call.

        Parameters
        ----------
        labels
            Integer class indices, shape ``(n,)`` (numpy or torch).
        t
            Times in ``[0, 1]``, shape ``(n,)`` or a scalar.

        Returns
        -------
        Branch ids of the same type and shape as ``labels``.
        """
        if isinstance(labels, torch.Tensor):
            starts = torch.as_tensor(self._starts, dtype=torch.float32, device=labels.device)
            ids = torch.as_tensor(self._ids, device=labels.device)
            return lookup_tables(starts, ids, labels, t)
        labels = np.asarray(labels, dtype=np.int64)
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), labels.shape)
        level = np.maximum((t[..., None] >= self._starts[labels]).sum(-1), 1) - 1
        return self._ids[labels, level]

    def heads_of(self, branch_ids):
        """Score-head index for each branch id (numpy or torch)."""
        if isinstance(branch_ids, torch.Tensor):
            return torch.as_tensor(self._heads, device=branch_ids.device)[branch_ids]
        return self._heads[np.asarray(branch_ids)]

    # ------------------------------------------------------------------ export
    def to_newick(self, digits: int = 4) -> str:
        """The tree in Newick format with branch lengths in units of diffusion time.

        Named nodes (:meth:`name_node`, the groups of a given hierarchy) are written as
        internal labels, so the string given back as a hierarchy keeps them.
        """

        def quoted(s: str) -> str:
            return s if _NEWICK_SAFE.match(s) else "'" + s.replace("'", "''") + "'"

        group = {bid: quoted(name) for name, bid in self.node_names.items()}

        def rec(bid: int) -> str:
            b = self.branches[bid]
            length = f"{round(b.length, digits):g}"
            if not b.children:
                return f"{quoted(self.classes[b.classes[0]])}:{length}"
            inner = ",".join(rec(ch) for ch in b.children)
            label = group.get(bid, "")
            return f"({inner}){label}:{length}" if b.parent >= 0 else f"({inner}){label}"

        return rec(self.root) + ";"

    def to_dict(self) -> dict:
        """An h5ad-safe description (only str keys, numpy arrays and scalars)."""
        membership = np.zeros((self.n_branches, self.n_classes), dtype=np.int8)
        trained = np.zeros_like(membership)
        for b in self.branches:
            membership[b.id, list(b.classes)] = 1
            trained[b.id, list(b.trained)] = 1
        # only once it differs (after an extension): records of other trees stay as they were
        extra = {} if np.array_equal(trained, membership) else {"trained": trained}
        return {
            "classes": np.array(self.classes, dtype=object),
            "membership": membership,
            "t_start": np.array([b.t_start for b in self.branches], dtype=np.float64),
            "t_end": np.array([b.t_end for b in self.branches], dtype=np.float64),
            "parent": np.array([b.parent for b in self.branches], dtype=np.int64),
            "head": np.array([b.head for b in self.branches], dtype=np.int64),
            "node_names": np.array(list(self.node_names), dtype=object),
            "node_branches": np.array(list(self.node_names.values()), dtype=np.int64),
            "newick": self.to_newick(),
            **extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BranchTree:
        """Rebuild a tree written by :meth:`~scbranch.module.BranchTree.to_dict`.

        Also after an h5ad round trip (which turns lists into arrays).
        """
        try:
            classes = [str(c) for c in np.asarray(d["classes"]).tolist()]
            membership = np.asarray(d["membership"])
            parent = np.asarray(d["parent"]).astype(int)
            t_start = np.asarray(d["t_start"], dtype=float)
            t_end = np.asarray(d["t_end"], dtype=float)
            head = np.asarray(d.get("head", np.arange(len(parent)))).astype(int)
            trained = np.asarray(d.get("trained", membership))
        except KeyError as err:
            raise ValueError(f"Not a scbranch hierarchy: missing field {err}.") from None
        if trained.shape != membership.shape:
            raise ValueError(
                f"Not a scbranch hierarchy: 'trained' has shape {trained.shape}, 'membership' "
                f"{membership.shape}."
            )
        children = {i: [] for i in range(len(parent))}
        for i, p in enumerate(parent):
            if p >= 0:
                children[int(p)].append(i)
        branches = [
            Branch(
                id=i,
                classes=tuple(int(c) for c in np.flatnonzero(membership[i])),
                t_start=float(t_start[i]),
                t_end=float(t_end[i]),
                parent=int(parent[i]),
                children=tuple(children[i]),
                head=int(head[i]),
                trained=tuple(int(c) for c in np.flatnonzero(trained[i])),
            )
            for i in range(len(parent))
        ]
        tree = cls(classes, branches)
        names, ids = d.get("node_names"), d.get("node_branches")
        if names is not None and ids is not None:
            tree.node_names = {
                str(n): int(b)
                for n, b in zip(np.asarray(names).tolist(), np.asarray(ids).tolist(), strict=True)
            }
        return tree

    def __repr__(self) -> str:
        return (
            f"BranchTree({self.n_classes} classes, {self.n_branches} branches): {self.to_newick(3)}"
        )

    def total_length(self, classes: Sequence[int] | None = None) -> float:
        """Sum of the lengths of all branches that the given classes pass through."""
        classes = range(self.n_classes) if classes is None else classes
        used = {b for c in classes for b in self.path(c)}
        return float(sum(self.branches[b].length for b in used))
