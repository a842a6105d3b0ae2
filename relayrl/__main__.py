"""``python -m relayrl`` is the ``relayrl`` command."""

import sys

from relayrl.cli import main

sys.exit(main())
