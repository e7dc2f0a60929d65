"""Every AnnData key scbranch writes or reads, named once (the pattern of CellRank's ``Key``).

Code anywhere in the package (tl, pl, model, baselines, CLI, demo) refers to these names, never
to string literals, so a key is renamed in one place and readers cannot drift from writers.
``tests/test_keys.py`` fails on a ``"scbranch..."`` key literal outside this file.
"""

from __future__ import annotations


class Key:
    """Names of the fields scbranch writes in (and reads back from) AnnData objects.

    Examples
    --------
    >>> Key.uns.HIERARCHY
    'scbranch_hierarchy'
    >>> Key.obs.TRAJECTORY, Key.phase.ENDPOINT
    ('trajectory', 'endpoint')
    """

    class uns:
        """``.uns`` keys."""

        #: discovered (or given) hierarchy: tree, Newick, similarity curves, params
        HIERARCHY = "scbranch_hierarchy"
        #: provenance of an AnnData scbranch made (generated cells, trajectories)
        GENERATED = "scbranch"
        #: table of :func:`scbranch.tl.evaluate` (``key_added``)
        EVALUATION = "scbranch_evaluation"
        #: params of :func:`scbranch.tl.embed_like`
        EMBED_LIKE = "scbranch_embed_like"
        #: gene ranking of :func:`scbranch.tl.rank_transmutation_genes`
        TRANSMUTATION_GENES = "scbranch_transmutation_genes"
        #: table of :func:`scbranch.tl.transmutation_success`
        TRANSMUTATION_SUCCESS = "scbranch_transmutation_success"
        #: table of :func:`scbranch.tl.identity_retention`
        IDENTITY_RETENTION = "scbranch_identity_retention"
        #: comparison of two hierarchies (:func:`scbranch.tl.compare_hierarchies`)
        HIERARCHY_COMPARISON = "scbranch_hierarchy_comparison"
        #: out-of-fold PC scores (:func:`scbranch.tl.pca_out_of_fold`), one record per obsm key
        OUT_OF_FOLD = "scbranch_out_of_fold"

    class obs:
        """``.obs`` columns."""

        #: True on every generated cell
        GENERATED = "scbranch_generated"
        #: library size a generated cell was decoded with (scVI models)
        LIBRARY_SIZE = "scbranch_library_size"
        #: size factor a generated cell's counts were made with (PCA and expression models)
        SIZE_FACTOR = "scbranch_size_factor"
        #: per-trajectory correlation of :func:`scbranch.tl.identity_retention`
        IDENTITY_RETENTION = "scbranch_identity_retention"
        #: the node a cell was asked for when generated at an internal node of the tree
        REQUESTED_NODE = "scbranch_requested_node"
        #: the real cell a cell was generated from (``model.generate_anchored``)
        ANCHOR = "scbranch_anchor"
        # trajectories (one row per cell and checkpoint)
        TRAJECTORY = "trajectory"
        CHECKPOINT = "checkpoint"
        T = "t"
        PHASE = "phase"
        BRANCH = "branch"
        SOURCE_LABEL = "source_label"
        TARGET_LABEL = "target_label"
        SOURCE_CELL = "source_cell"
        #: :func:`scbranch.tl.rank_transmutation_genes`: the target on endpoint rows, "source"
        #: on source rows, NaN in between (the groupby of scanpy's ``rank_genes_groups_*`` plots)
        TRANSMUTATION_GROUP = "scbranch_transmutation_group"
        # hybrids
        PAIR = "pair"
        SIDE = "side"

    class obsm:
        """``.obsm`` keys."""

        #: noisy state of a trajectory row (the latent keys hold the clean estimate)
        STATE = "scbranch_state"
        #: the shared state of a hybrid pair at the branch point
        BRANCH_STATE = "scbranch_branch_state"

    class layers:
        """``.layers`` keys of generated cells."""

        COUNTS = "counts"
        #: scVI's normalised expression (rows sum to 1)
        SCALE = "scale"

    class phase:
        """Values of ``obs['phase']`` along a transmutation, in the order a cell passes them."""

        SOURCE = "source"
        UP = "up"
        BRANCH_POINT = "branch point"
        DOWN = "down"
        ENDPOINT = "endpoint"
        ALL = (SOURCE, UP, BRANCH_POINT, DOWN, ENDPOINT)
        #: from the branch point down to the endpoint
        DOWN_PHASES = (BRANCH_POINT, DOWN, ENDPOINT)
