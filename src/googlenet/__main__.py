"""`python -m googlenet ...` (and `torchrun -m googlenet train ...`)."""

import sys

from googlenet.cli import main

sys.exit(main())
