"""`python -m pegasus_x ...` = the `pegasus-x` command (also what `torchrun -m pegasus_x` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
