"""`python -m edgekit` is the `edgekit` command."""

import sys

from edgekit.cli import main

sys.exit(main())
