"""`python -m saeft_hf <command>`: the `saeft` command without its console script."""

import sys

from saeft_hf.cli import main

sys.exit(main())
