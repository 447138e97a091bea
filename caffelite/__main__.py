"""``python -m caffelite ...``: the ``caffelite`` command."""
import sys

from .cli import main

sys.exit(main())
