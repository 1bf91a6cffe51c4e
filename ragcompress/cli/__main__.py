"""``python -m ragcompress.cli``."""

from ragcompress.cli import main

main()
