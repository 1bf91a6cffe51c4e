"""``ragcompress serve``: a long-running, OpenAI-compatible answering service (docs/serve.md).

Needs the ``serve`` extra (``pip install 'ragcompress-kv[serve]'``: starlette, uvicorn,
prometheus_client). :func:`create_app` builds the ASGI app from an open engine or a store path;
:func:`run` serves it on uvicorn with a graceful SIGTERM.
"""

from ragcompress.serve.app import create_app
from ragcompress.serve.server import run
from ragcompress.serve.settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "run"]
