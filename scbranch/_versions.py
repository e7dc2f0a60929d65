"""The versions of the packages that decide which cells a seed draws.

A seed reproduces a run's cells only with the same package versions (docs/evaluation.md,
"What a rerun reproduces": another numpy or torch, or another BLAS thread count, draws other
cells from the same seed), so every AnnData the model makes records them next to its seed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: the packages whose versions can change a generated cell: the model and its sampler
#: (scbranch, torch), the decoders and baselines (numpy, scipy, scvi-tools), the container
#: (anndata)
PACKAGES = ("scbranch", "torch", "numpy", "scipy", "scvi-tools", "anndata")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package, ``"not installed"`` for a missing one.

    Examples
    --------
    >>> versions = package_versions(("numpy", "no-such-package-xyz"))
    >>> versions["no-such-package-xyz"]
    'not installed'
    >>> versions["numpy"] == __import__("numpy").__version__
    True
    """
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found
