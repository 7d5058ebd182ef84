"""``python -m softtargets.cli``: the ``softtargets`` command."""

import sys

from . import main

if __name__ == "__main__":  # dask's worker processes import this module again: they must not run the command
    sys.exit(main())
