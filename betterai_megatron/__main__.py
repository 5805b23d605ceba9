"""``python -m betterai_megatron`` (what ``torchrun -m betterai_megatron`` runs): the ``betterai`` CLI."""

import sys

from betterai_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
