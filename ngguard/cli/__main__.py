"""``python -m ngguard.cli``: the ``ngguard`` command."""
import sys

from ngguard.cli import main

sys.exit(main())
