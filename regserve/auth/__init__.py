"""Authentication and access control: htpasswd, Docker tokens (verifying and issuing), policy."""

from .controller import AccessController, Identity
from .scopes import CATALOG, Access

__all__ = ["CATALOG", "Access", "AccessController", "Identity"]
