"""Package a trained model as a shipped model: `python launch/ship_model.py --checkpoint runs/<run>/best --name NAME ...`.

A thin wrapper over ``cmgnet.ship.main``; see ``python launch/ship_model.py --help``.
"""

import sys

from cmgnet.ship import main

if __name__ == "__main__":
    sys.exit(main())
