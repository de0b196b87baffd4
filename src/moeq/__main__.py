"""``python -m moeq`` (and ``torchrun ... -m moeq``): the ``moeq`` command."""

import sys

from .cli import main

sys.exit(main())
