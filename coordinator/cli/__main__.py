"""``python -m coordinator.cli`` is the same as the ``fedsight`` console script."""
import sys

from coordinator.cli.main import main

sys.exit(main())
