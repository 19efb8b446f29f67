"""One exception type for every user-facing failure: the CLI prints its message, never a traceback.
It lives in the lowest layer so that engines can raise it; `fromage.runtime` re-exports it."""


class FromageError(Exception):
    """A problem with the user's input, files or configuration, stated so they can fix it."""
