"""``python -m haven.cli``: what torchrun and the multi-node tune launch run."""

import sys

from haven.cli import main

sys.exit(main())
