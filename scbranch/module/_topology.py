"""Hierarchies users already have: a topology from Newick, nested labels or a linkage.

The topology comes from the user; each node's branch time comes from the data (the crossover
of its children's similarity curves, the same criterion and pooling as discovery's average
linkage, kept increasing towards the root) or from the Newick branch lengths. A node with more
than two children (common in annotation levels) is kept as it is, or resolved into binary
merges by the data. Everything here is pure: class names in, a :class:`BranchTree` out.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._discovery import agglomerate_average, crossover_times
from ._tree import Branch, BranchTree

#: how node times are set
TIME_SOURCES = ("data", "newick")
#: what happens to nodes with more than two children
MULTIFURCATIONS = ("keep", "resolve")


class HierarchyError(ValueError):
    """A hierarchy that does not fit the cell types (with the problem and the fix).

    Examples
    --------
    >>> check_topology(parse_newick("((A,B),C);"), ["A", "B"])
    Traceback (most recent call last):
    ...
    scbranch.module._topology.HierarchyError: The hierarchy names label(s) ['C'] ...
    """


@dataclass
class Node:
    """A node of a user's hierarchy: a leaf (a cell type) or a group of nodes.

    Examples
    --------
    >>> root = Node("lymphoid", [Node("T"), Node("B")])
    >>> root.leaves(), root.is_leaf
    (['T', 'B'], False)
    """

    name: str | None = None
    children: list[Node] = field(default_factory=list)
    #: Newick branch length above the node
    length: float | None = None

    @property
    def is_leaf(self) -> bool:
        """A cell type."""
        return not self.children

    #: further names of the same node (unary groups collapsed into it)
    aliases: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """Every name the node is known by (a leaf's own name excluded)."""
        own = [] if self.is_leaf or self.name is None else [self.name]
        return own + self.aliases

    def leaves(self) -> list[str]:
        """Cell types below the node, left to right."""
        if self.is_leaf:
            return [str(self.name)]
        return [leaf for child in self.children for leaf in child.leaves()]

    def walk(self):
        """Every node below (and including) this one, children before parents."""
        for child in self.children:
            yield from child.walk()
        yield self


# ---------------------------------------------------------------------------- Newick
_TOKEN = re.compile(r"\s*(?:(\[[^\]]*\])|('(?:[^']|'')*')|([(),:;])|([^\s(),:;\[\]']+))")


#: how far (in diffusion time) the paths from a node to its types may differ unwarned
ULTRAMETRIC_TOLERANCE = 1e-3


def _describe(node: Node) -> str:
    """A node as messages name it: its name, else the types below it."""
    if node.name is not None:
        return repr(str(node.name))
    leaves = node.leaves()
    shown = ", ".join(repr(v) for v in leaves[:3]) + (", ..." if len(leaves) > 3 else "")
    return f"the node above {shown}"


def parse_newick(text: str) -> Node:
    """Parse a Newick string (names, quoted names, branch lengths, comments).

    Unquoted names may hold single spaces (``(CD4 T,CD8 T)``); names with other characters
    Newick reserves (``( ) , : ; [ ]``, quotes) or several spaces in a row are quoted
    (``'CD4+ (naive)'``, a quote inside doubled).

    Examples
    --------
    >>> root = parse_newick("((A:0.2,B:0.2)AB:0.3,'C d':0.5);")
    >>> root.leaves(), root.children[0].name, root.children[0].length
    (['A', 'B', 'C d'], 'AB', 0.3)
    >>> parse_newick("((CD4 T,CD8 T)T cells,B);").leaves()
    ['CD4 T', 'CD8 T', 'B']
    """
    tokens, pos = [], 0
    text = str(text).strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise HierarchyError(f"The Newick string does not parse at position {pos}: {text!r}.")
        pos = m.end()
        comment, quoted, punct, word = m.groups()
        if comment is not None:
            continue
        if quoted is not None:
            tokens.append(("name", quoted[1:-1].replace("''", "'"), m.start()))
        elif punct is not None:
            tokens.append((punct, punct, m.start()))
        elif word is not None:
            if tokens and tokens[-1][0] == "word":
                # cell types have spaces ("CD4 T"): unquoted words in a row are one name (in
                # strict Newick a syntax error), joined by one space; quote other spacing
                tokens[-1] = ("word", f"{tokens[-1][1]} {word}", tokens[-1][2])
            else:
                tokens.append(("word", word, m.start()))
    tokens = [("name" if kind == "word" else kind, value, at) for kind, value, at in tokens]
    index = 0

    def fail(expected: str):
        where = tokens[index][2] if index < len(tokens) else len(text)
        got = repr(tokens[index][1]) if index < len(tokens) else "the end"
        raise HierarchyError(
            f"The Newick string does not parse: expected {expected} at position {where}, got "
            f"{got} (in {text!r})."
        )

    def peek() -> str | None:
        return tokens[index][0] if index < len(tokens) else None

    def node() -> Node:
        nonlocal index
        out = Node()
        if peek() == "(":
            index += 1
            out.children.append(node())
            while peek() == ",":
                index += 1
                out.children.append(node())
            if peek() != ")":
                fail("',' or ')'")
            index += 1
        if peek() == "name":
            out.name = tokens[index][1]
            index += 1
        if peek() == ":":
            index += 1
            if peek() != "name":
                fail("a branch length")
            try:
                out.length = float(tokens[index][1])
            except ValueError:
                fail("a number")
            index += 1
        if out.is_leaf and out.name is None:
            fail("a cell type name")
        return out

    if not tokens:
        raise HierarchyError("The Newick string is empty.")
    root = node()
    if peek() == ";":
        index += 1
    if index != len(tokens):
        fail("';' (the end of the tree)")
    return root


# ---------------------------------------------------------------------------- other forms
def topology_of(tree: BranchTree) -> Node:
    """A tree's topology, with its node names and its branch lengths as Newick lengths.

    Read back with ``times="newick"`` it gives the tree's own branch times; with
    ``times="data"`` the topology is timed on other cells.

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    >>> root = topology_of(tree)
    >>> sorted(root.leaves()), sorted(child.length for child in root.children)
    (['A', 'B', 'C'], [0.3, 0.6])
    """
    names: dict[int, list[str]] = {}
    for name, branch_id in tree.node_names.items():
        names.setdefault(int(branch_id), []).append(str(name))

    def node(branch_id: int) -> Node:
        branch = tree.branches[branch_id]
        length = None if branch.parent < 0 else float(branch.length)
        if not branch.children:
            return Node(name=tree.classes[branch.classes[0]], length=length)
        own = names.get(branch_id, [])
        return Node(
            name=own[0] if own else None,
            children=[node(c) for c in branch.children],
            length=length,
            aliases=own[1:],
        )

    return node(tree.root)


def from_nested(obj, name: str | None = None) -> Node:
    """A topology from nested dicts (named groups) and lists (unnamed groups) of labels.

    Examples
    --------
    >>> from_nested({"T": ["CD4", "CD8"], "B": "B cell"}).leaves()
    ['CD4', 'CD8', 'B cell']
    """
    if isinstance(obj, str):
        return Node(name=obj) if name is None else Node(name=name, children=[Node(name=obj)])
    if isinstance(obj, Mapping):
        return Node(name=name, children=[from_nested(v, str(k)) for k, v in obj.items()])
    if isinstance(obj, Sequence | np.ndarray):
        return Node(name=name, children=[from_nested(v) for v in obj])
    raise HierarchyError(
        f"A nested hierarchy holds dicts, lists and label strings; got a {type(obj).__name__}."
    )


def from_linkage(linkage: np.ndarray, labels: Sequence[str]) -> Node:
    """A binary topology from a SciPy linkage over ``labels`` (e.g. ``sc.tl.dendrogram``'s).

    Examples
    --------
    >>> from scipy.cluster.hierarchy import linkage
    >>> z = linkage(np.array([[0.0], [0.1], [5.0]]), method="average")
    >>> [child.leaves() for child in from_linkage(z, ["T", "NK", "B"]).children]
    [['B'], ['T', 'NK']]
    """
    z = np.asarray(linkage, dtype=np.float64)
    n = len(labels)
    if z.ndim != 2 or z.shape != (n - 1, 4):
        raise HierarchyError(
            f"A linkage over {n} categories has {n - 1} rows of 4 values, got {z.shape}."
        )
    nodes = [Node(name=str(label)) for label in labels]
    for a, b, *_ in z:
        nodes.append(Node(children=[nodes[int(a)], nodes[int(b)]]))
    return nodes[-1]


# ---------------------------------------------------------------------------- checks
def _simplify(node: Node) -> Node:
    """Nodes with one child are collapsed into it; their names become its aliases.

    (Annotation levels often hold a group of one: the lineage "B cell" of the type "B".)
    """
    node.children = [_simplify(c) for c in node.children]
    if len(node.children) == 1:
        child = node.children[0]
        if node.name is not None and node.name != child.name and node.name not in child.aliases:
            if child.is_leaf or child.name is not None:
                child.aliases.append(node.name)
            else:
                child.name = node.name
        child.aliases.extend(a for a in node.aliases if a not in child.aliases)
        child.length = node.length if child.length is None else child.length
        return child
    return node


def check_topology(root: Node, classes: Sequence[str]) -> Node:
    """The topology, simplified and checked against ``classes``; raise a clear error otherwise.

    Every class must be a leaf exactly once, every leaf a class, and internal node names must
    be unique and differ from every class name.

    Examples
    --------
    Groups of one (the lineage "B cell" holding only the type "B") collapse into their child:

    >>> root = check_topology(from_nested({"lymphoid": ["T", {"B cell": ["B"]}]}), ["T", "B"])
    >>> root.name, [c.name for c in root.children], root.children[1].aliases
    ('lymphoid', ['T', 'B'], ['B cell'])
    """
    root = _simplify(root)
    leaves = root.leaves()
    known = set(classes)
    counts: dict[str, int] = {}
    for leaf in leaves:
        counts[leaf] = counts.get(leaf, 0) + 1
    twice = sorted(c for c, n in counts.items() if n > 1)
    if twice:
        raise HierarchyError(
            f"Label(s) {twice} appear more than once in the hierarchy; every cell type must sit "
            "in exactly one place."
        )
    unknown = sorted(set(leaves) - known)
    if unknown:
        raise HierarchyError(
            f"The hierarchy names label(s) {unknown} that are not cell types of the data "
            f"({sorted(known)}). Fix the spelling, or subset the data to the types it covers."
        )
    missing = [c for c in classes if c not in counts]
    if missing:
        raise HierarchyError(
            f"Cell type(s) {missing} are missing from the hierarchy; every type of the data must "
            "sit in it (add them, or drop those cells)."
        )
    if root.is_leaf:
        raise HierarchyError("A hierarchy needs at least two cell types.")
    names: dict[str, int] = {}
    for node in root.walk():
        for own in node.names():
            if own in known and not (node.is_leaf and own == node.name):
                raise HierarchyError(
                    f"The node name {own!r} is also a cell type of another node; rename the "
                    "node (names of groups must differ from the cell types)."
                )
            names[own] = names.get(own, 0) + 1
    repeated = sorted(n for n, k in names.items() if k > 1)
    if repeated:
        raise HierarchyError(f"Node name(s) {repeated} are used twice in the hierarchy.")
    return root


# ---------------------------------------------------------------------------- times
def _pooled(members: list[list[int]], intra: np.ndarray, inter: np.ndarray):
    """Class-balanced similarity curves of sets of classes, as discovery's average linkage."""
    n = intra.shape[0]
    sim = inter.copy()
    idx = np.arange(n)
    sim[idx, idx] = intra
    weights = np.zeros((len(members), n))
    for g, cls in enumerate(members):
        weights[g, cls] = 1.0 / len(cls)
    pooled = np.einsum("gi,ijt,hj->ght", weights, sim, weights)
    return np.einsum("ggt->gt", pooled), pooled


def tree_from_topology(
    root: Node,
    classes: Sequence[str],
    *,
    times: str = "data",
    multifurcations: str = "keep",
    curves: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    epsilon: float = 0.005,
    min_branch_length: float = 0.02,
) -> BranchTree:
    """A :class:`BranchTree` with the user's topology and branch times from data or Newick.

    Parameters
    ----------
    root
        The topology (:func:`parse_newick`, :func:`from_nested`, :func:`from_linkage`).
    classes
        Class names; leaf branch ids follow their order, as in discovered trees.
    times
        ``"data"``: a node's time is the crossover of its children's pooled similarity curves
        (for more than two children, the last pair to cross), at least ``min_branch_length``
        above each child; ``"newick"``: its height above the leaves in the Newick lengths.
    multifurcations
        ``"keep"``: a node with k > 2 children stays one branch point; ``"resolve"``: its
        children are merged two at a time in the order the data cross (average linkage), so
        the tree becomes binary there (``times="data"`` only).
    curves
        ``(times, intra, inter)`` of :func:`~scbranch.module._discovery.similarity_curves`
        (smoothed), needed for ``times="data"``.
    epsilon, min_branch_length
        As in discovery.

    Returns
    -------
    The tree (internal nodes keep their names in ``tree.node_names``).
    """
    if times not in TIME_SOURCES:
        raise ValueError(f"times must be one of {TIME_SOURCES}, got {times!r}.")
    if multifurcations not in MULTIFURCATIONS:
        raise ValueError(
            f"multifurcations must be one of {MULTIFURCATIONS}, got {multifurcations!r}."
        )
    if times == "newick" and multifurcations == "resolve":
        raise ValueError("Resolving multifurcations needs times from the data (times='data').")
    if times == "data" and curves is None:
        raise ValueError("times='data' needs the similarity curves.")
    root = check_topology(root, classes)
    index = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    branches = [Branch(id=i, classes=(i,), t_start=0.0, t_end=1.0) for i in range(n)]
    names: dict[str, int] = {}
    node_time: dict[int, float] = {i: 0.0 for i in range(n)}

    def join(child_ids: list[int], t: float, node_names: Sequence[str]) -> int:
        new_id = len(branches)
        members = tuple(sorted(c for b in child_ids for c in branches[b].classes))
        for b in child_ids:
            branches[b].t_end = float(t)
            branches[b].parent = new_id
        branches.append(Branch(new_id, members, float(t), 1.0, children=tuple(sorted(child_ids))))
        node_time[new_id] = float(t)
        names.update(dict.fromkeys(node_names, new_id))
        return new_id

    def crossing(child_ids: list[int]) -> float:
        grid, intra, inter = curves
        members = [list(branches[b].classes) for b in child_ids]
        g_intra, g_inter = _pooled(members, intra, inter)
        label = ["+".join(classes[c] for c in m) for m in members]
        cross = crossover_times(g_intra, g_inter, grid, epsilon=epsilon, classes=label)
        return float(cross[np.triu_indices(len(child_ids), 1)].max())

    def resolve(child_ids: list[int], node_names: Sequence[str]) -> int:
        grid, intra, inter = curves
        members = [list(branches[b].classes) for b in child_ids]
        # the merges of average linkage among these sets, each set treated as one class
        g_intra, g_inter = _pooled(members, intra, inter)
        agg = agglomerate_average(
            g_intra, g_inter, grid, epsilon=epsilon, min_branch_length=min_branch_length
        )
        top = {g: b for g, b in enumerate(child_ids)}
        for k, (set_a, set_b, t) in enumerate(agg.merges):
            a, b = top[set_a[0]], top[set_b[0]]
            t = max(t, node_time[a] + min_branch_length, node_time[b] + min_branch_length)
            last = k == len(agg.merges) - 1
            joined = join([a, b], t, node_names if last else ())
            for g in (*set_a, *set_b):
                top[g] = joined
        return joined

    heights_of: dict[int, float] = {}  # each node's height once (and its warning once)

    def height(node: Node) -> float:
        if node.is_leaf:
            return 0.0
        if id(node) in heights_of:
            return heights_of[id(node)]
        heights = []
        for child in node.children:
            if child.length is None:
                raise HierarchyError(
                    "times='newick' needs a branch length on every node of the Newick string; "
                    "give them, or estimate the times from the data (times='data')."
                )
            if child.length < 0:
                raise HierarchyError(
                    f"The Newick string gives {_describe(child)} a negative branch "
                    f"length ({child.length:g}); lengths are times and must be >= 0."
                )
            heights.append(height(child) + child.length)
        # Newick written with 4 decimals (BranchTree.to_newick) sums rounding errors of up to
        # 5e-5 per branch along a path: below 1e-3 of diffusion time nothing moves visibly
        if max(heights) - min(heights) > ULTRAMETRIC_TOLERANCE:
            warnings.warn(
                f"The Newick lengths are not ultrametric: the paths from "
                f"{_describe(node)} down to its types differ ({min(heights):g} to "
                f"{max(heights):g}); the node is placed at the longest one.",
                UserWarning,
                stacklevel=2,
            )
        heights_of[id(node)] = max(heights)
        return heights_of[id(node)]

    def build(node: Node) -> int:
        if node.is_leaf:
            leaf = index[str(node.name)]
            names.update(dict.fromkeys(node.aliases, leaf))
            return leaf
        child_ids = [build(child) for child in node.children]
        if times == "newick":
            t = height(node)
            low = max(node_time[b] for b in child_ids)
            if not low < t < 1.0:
                raise HierarchyError(
                    f"The Newick lengths put a node at height {t:g}, which must lie above its "
                    f"children ({low:g}) and below 1 (the diffusion time of pure noise)."
                )
            return join(child_ids, t, node.names())
        if len(child_ids) > 2 and multifurcations == "resolve":
            return resolve(child_ids, node.names())
        t = max(crossing(child_ids), *(node_time[b] + min_branch_length for b in child_ids))
        return join(child_ids, t, node.names())

    top = build(root)
    if node_time[top] > 1.0 - min_branch_length:
        raise HierarchyError(
            f"The root of the hierarchy lands at t={node_time[top]:.3f}, leaving no root branch; "
            "decrease min_branch_length or increase beta1 so the types merge earlier."
        )
    tree = BranchTree(classes, branches)
    tree.node_names = names
    return tree
