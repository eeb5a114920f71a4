"""``python -m sam.cli``: the ``sam-landscape`` command (and ``torchrun -m sam.cli``)."""

import sys

from sam.cli import main

sys.exit(main())
