"""The test suite. It starts hundreds of Python processes (CLI runs, worker pools, sandboxes, the
smokes): each imports notifyctl, and without cached bytecode compiles every module of ours again.
Some machines set PYTHONDONTWRITEBYTECODE; for the suite and the processes it starts it is lifted,
so each module is compiled once (into __pycache__/, which git ignores). Measured on a 2-core
machine under load ~9: tests/test_cli.py with tests/test_store_split.py took 54.7 s of CPU with it
set and 44.6 s without."""

import os
import sys

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
