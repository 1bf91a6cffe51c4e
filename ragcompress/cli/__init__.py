"""The ``ragcompress`` command line (DESIGN §3): index, ask, eval, bench, verify, serve.

Every command prints human-readable output (progress bars only on a terminal); ``--json`` prints
exactly one JSON object on stdout. Errors exit non-zero with one line on stderr.
"""

from ragcompress.cli.options import BACKEND_OPTION, PRESET_HELP
from ragcompress.cli.root import app, main
from ragcompress.cli.store import store_sizes

__all__ = ["BACKEND_OPTION", "PRESET_HELP", "app", "main", "store_sizes"]
