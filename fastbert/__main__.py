"""`python -m fastbert ...`: the `fastbert` command, for environments whose scripts folder is not on PATH."""
import sys

from fastbert.cli import main

sys.exit(main())
