"""The HTTP layer: thin handlers over the registry layer."""

from .app import make_app

__all__ = ["make_app"]
