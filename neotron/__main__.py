"""`python -m neotron ...` (what torchrun launches with `-m neotron`)."""

import sys

from neotron.cli import main

sys.exit(main())
