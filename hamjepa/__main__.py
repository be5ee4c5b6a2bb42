"""`python -m hamjepa ...` is the `hamjepa` command."""

import sys

from hamjepa.cli import main

sys.exit(main())
