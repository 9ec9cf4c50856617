"""``python -m kcprnn``: the ``kcprnn`` command (``torchrun -m kcprnn train ...`` runs it in
every process)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
