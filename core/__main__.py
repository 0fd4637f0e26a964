import os
import sys

from .cli import main

code = main()
if code == 130:
    # Interrupted: the run folder is already marked incomplete and every file is written. Skip the interpreter's
    # teardown, which for torch takes about 2 s, so that Ctrl-C ends the process at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
