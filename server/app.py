"""The ServerApp Flower loads (``server.app:app``, pyproject's [tool.flwr.app.components]):
built by ``server.runtime.serverapp.make_app``."""

from server.runtime.serverapp import make_app

app = make_app()
