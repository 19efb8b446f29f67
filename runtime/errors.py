"""The runtime's error type: the engines' FromageError, re-exported for callers of the runtime."""
from fromage.engines.errors import FromageError

__all__ = ["FromageError"]
