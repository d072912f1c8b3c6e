"""`python -m tinkerlm` is `tinkerlm`."""

import sys

from tinkerlm.cli import main

sys.exit(main())
