"""The ``scbranch`` logger: one RichHandler, no propagation (same pattern as scvi-tools)."""

import logging

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


_configure_logger()
