"""`python -m ctzarr.cli`."""

import sys

from ctzarr.cli.main import main

sys.exit(main())
