"""``python -m p2pchat.broker``: run a broker (the same options as ``p2pchat broker``)."""

import sys

from p2pchat.broker.cli import main

sys.exit(main())
