"""``python -m scbranch``: the ``scbranch`` command (as ``python -m scbranch.cli``)."""

import sys

from .cli import main

sys.exit(main())
