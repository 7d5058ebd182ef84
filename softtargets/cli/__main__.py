"""``python -m softtargets.cli``: the ``softtargets`` command."""

import sys

from . import main

sys.exit(main())
