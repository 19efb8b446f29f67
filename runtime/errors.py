"""The runtime's error types: the engines' FromageError and ParameterError, re-exported for its callers."""
from fromage.engines.errors import FromageError, ParameterError

__all__ = ["FromageError", "ParameterError"]
