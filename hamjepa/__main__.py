"""`python -m hamjepa ...` is the `hamjepa` command."""

import sys

from .cli import main

sys.exit(main())
