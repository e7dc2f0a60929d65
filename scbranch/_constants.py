"""Registry keys of the scvi-tools data registration (AnnData keys live in ``_keys.Key``)."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    REP_KEY: str = "rep"


REGISTRY_KEYS = _RegistryKeys()
