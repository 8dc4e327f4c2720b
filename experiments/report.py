"""``python -m experiments.report``: the command line of :mod:`experiments.analysis.report`."""

import sys

from experiments.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
