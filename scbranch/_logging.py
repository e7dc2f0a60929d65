"""The ``scbranch`` logger (one RichHandler, no propagation, as scvi-tools) and quiet output."""

import contextlib
import logging
import warnings

# scvi-tools' AnnDataManager prints with rich.pretty without importing it, so the model's
# view_anndata_setup / view_setup_args failed unless something else had imported it
import rich.pretty  # noqa: F401
from rich.console import Console
from rich.logging import RichHandler

logger = logging.getLogger("scbranch")


def _configure_logger() -> None:
    if logger.handlers:
        return
    handler = RichHandler(
        console=Console(stderr=True), show_path=False, show_time=False, markup=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _NoMarketingTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


#: loggers Lightning's rank-zero messages go through (fabric's and the trainer's)
_LIGHTNING_RANK_ZERO = (
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
)


def _quiet_lightning_tips() -> None:
    for name in _LIGHTNING_RANK_ZERO:
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoMarketingTips) for f in target.filters):
            target.addFilter(_NoMarketingTips())


@contextlib.contextmanager
def quiet_training_warnings():
    """Silence warnings of the training stack that say nothing about the user's data.

    torch's deprecation of ``LeafSpec`` raised from inside Lightning, and Lightning's note that
    a loader has few workers (the data are in memory; workers would only add start-up cost).
    The block loader (``model/_streaming.py``) yields whole batches from one process, so
    Lightning's notes on an iterable dataset's length with several workers and on guessing
    the batch size from a dict do not apply either.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=r".*infer the `batch_size` from an ambiguous.*")
        yield


_configure_logger()
_quiet_lightning_tips()
