"""``python -m harness``: see :mod:`harness.cli`."""

import sys

from harness import signals
from harness.cli import main

code = main()
signals.exit_quietly(code)  # a stop signal from here on (a launcher ending its workers): this code, no traceback
sys.exit(code)
