"""The web UI at /ui/: server-rendered pages over the registry layer (registry/inventory.py),
behind the API's own authentication and access policy."""

from .views import setup

__all__ = ["setup"]
