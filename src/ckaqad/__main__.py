"""`python -m ckaqad COMMAND [flags]`: the same command line as the `ckaqad` console script."""

import sys

from ckaqad.cli import main

if __name__ == "__main__":
    sys.exit(main())
