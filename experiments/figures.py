"""``python -m experiments.figures``: the command line of :mod:`experiments.analysis.figures`."""

import sys

from experiments.analysis.figures import main

if __name__ == "__main__":
    sys.exit(main())
