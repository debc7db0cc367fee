"""`python -m captune ...`, also under `torchrun --nproc-per-node N -m captune ...`."""

import sys

from captune.cli import main

sys.exit(main())
