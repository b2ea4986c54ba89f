"""``python -m torchkeep``: the torchkeep command."""

import sys

from torchkeep.cli import main

sys.exit(main())
