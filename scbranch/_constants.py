"""Registry keys of the scvi-tools data registration (AnnData keys live in ``_keys.Key``)."""

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    REP_KEY: str = "rep"


REGISTRY_KEYS = _RegistryKeys()


class _NoiseKeys(NamedTuple):
    """Per-step noise instructions the block loader puts in a batch (``model/_streaming.py``).

    ``KEY`` seeds the draw of a whole global batch, ``OFFSET`` and ``ROWS`` say which rows of
    it are this process's: the module draws the times and noise of the global batch and keeps
    its rows, so a multi-device step draws what one device would.
    """

    KEY: str = "noise_key"
    OFFSET: str = "noise_offset"
    ROWS: str = "noise_rows"


NOISE_KEYS = _NoiseKeys()
