"""Does the tree's topology change the cells: a latent's own tree against the expression's.

On a simulated atlas with a known tree and on two real datasets' annotation hierarchies, trees
found in scVI latents lose coarse clades that the normalised expression finds
(``benchmarks/latent_tree.py``). So ``from_scvi_model`` takes its default tree's topology from
the expression (the counts scVI models, log1p(CP10k)) and its branch times from the latent; a
PC model discovers its tree in its PC scores, and ``hierarchy=<Newick>`` gives it the
expression's topology. This study asks what the topology costs or gains in the generated
cells, with the protocol and instrument of ``benchmarks/quality.py`` (same splits, same
``tl.evaluate``, reference PCA fitted on the train cells only, 3 training x 3 generation
seeds). Both rows of a space share everything but the tree: the same scVI model (same seed),
the same network initialisation and minibatches.

Rows:
  conditioned              the default: out-of-fold PC scores, tree discovered in them
  conditioned:exprtree     the same, with the topology the train cells' log-normalised
                           expression gives (``quality.expression_newick``) and branch times
                           from the PC scores
  conditioned:scvi         scVI's latent means, the default tree: the expression's topology,
                           branch times from the latent
  conditioned:scvi:latenttree   the same scVI latent, with the tree discovered in the latent
                           (topology and times; the default before the expression's topology)
  probe: real cells, unseen   real cells no model or space saw, judged like a generator: the
                           known answer, must sit at the control

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/expression_tree.py            # about 40 min on 2 cores
  python benchmarks/expression_tree.py --fast     # smoke test (numbers meaningless)
Writes docs/benchmarks/expression_tree.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys

import variants

ROWS = (
    variants.DEFAULT,
    f"{variants.DEFAULT}:exprtree",
    f"{variants.DEFAULT}:scvi",
    f"{variants.DEFAULT}:scvi:latenttree",
)
TITLE = "A latent's own tree against the expression's topology"
INTRO = (
    "Each space's model with the tree discovered in its own representation and with the "
    "topology the train cells' log-normalised expression gives, branch times from the model's "
    "own space. The PC model discovers its own tree by default (`:exprtree`: the expression's "
    "topology, as `hierarchy=<Newick>` gives it); the scVI model takes the expression's "
    "topology by default (`:latenttree`: the tree discovered in scVI's latent, the default "
    "before). Both rows of a space share everything but the tree. The `tree` column: branch "
    "points and their times. Which topology each representation finds on these datasets, "
    "against their annotation hierarchies: [latent_tree](latent_tree.md)."
)
COMPARISONS = ((f"{variants.DEFAULT}:scvi", f"{variants.DEFAULT}:scvi:latenttree"),)


def main(argv=None) -> int:
    return variants.main(
        argv,
        script="expression_tree.py",
        title=TITLE,
        intro=INTRO,
        rows=ROWS,
        comparisons=COMPARISONS,
    )


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
