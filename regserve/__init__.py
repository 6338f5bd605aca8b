"""regserve: a container registry (OCI Distribution 1.1, Docker Registry V2) on aiohttp."""

__version__ = "0.1.0"
