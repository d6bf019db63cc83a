"""`python -m growth` is the `growth` command."""

import sys

from growth.cli import main

sys.exit(main())
