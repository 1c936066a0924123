"""`python -m runner` (and `torchrun -m runner RECIPE`): the same as the `runner` command."""

import sys

from runner.cli import main

sys.exit(main())
