"""``python -m scbranch.cli``: the ``scbranch`` command."""

import sys

from . import main

sys.exit(main())
