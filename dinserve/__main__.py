"""`python -m dinserve`: the same as the `dinserve` command."""

import sys

from dinserve.cli import main

sys.exit(main())
