"""Keep the training masks a reference model agrees with: a thin wrapper over ``cmgnet.data.agreement``.

``python launch/agreement_split.py --help``; the module docstring has the whole recipe.
"""

import sys

from cmgnet.data.agreement import main

if __name__ == "__main__":
    sys.exit(main())
