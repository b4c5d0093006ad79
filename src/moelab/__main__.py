"""``python -m moelab`` (what ``torchrun -m moelab`` runs)."""

import sys

from moelab.cli.main import main

sys.exit(main())
