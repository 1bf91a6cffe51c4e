"""``python -m ragcompress.cli``: the console script, exit status included."""

from ragcompress.cli import main
from ragcompress.interrupts import INTERRUPTED, exit_interrupted

try:
    main()
except SystemExit as stop:
    if stop.code == INTERRUPTED:
        exit_interrupted()
    raise
