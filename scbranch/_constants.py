"""Registry keys and default AnnData keys used throughout scbranch."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    REP_KEY: str = "rep"


class _UnsKeys(NamedTuple):
    HIERARCHY: str = "scbranch_hierarchy"
    GENERATED: str = "scbranch"


class _ObsKeys(NamedTuple):
    GENERATED: str = "scbranch_generated"


REGISTRY_KEYS = _RegistryKeys()
UNS_KEYS = _UnsKeys()
OBS_KEYS = _ObsKeys()
