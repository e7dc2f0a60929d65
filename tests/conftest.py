import sys
from pathlib import Path

import pytest

# make tests/_gaussian.py (and other test helpers) importable as top-level modules
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one intra-op thread is faster, and far faster on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run every test in its own directory with a fixed scvi seed and log dir."""
    import scvi

    monkeypatch.chdir(tmp_path)
    scvi.settings.seed = 0
    scvi.settings.logging_dir = tmp_path
    yield


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler during the test, whatever the runner inherited.

    A job started in the background by a non-interactive shell (as CI runners may do) ignores
    SIGINT, and a Ctrl-C test would then test nothing.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
