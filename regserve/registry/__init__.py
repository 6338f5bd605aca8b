"""The registry layer: repositories, blobs, manifests, tags, uploads. Knows nothing of HTTP."""

from .registry import Registry, Repository

__all__ = ["Registry", "Repository"]
