"""Code shared by the ServerApp and the ClientApp (imports neither)."""

__version__ = "0.1.0"
