"""One exception type for every user-facing failure: the CLI prints its message, never a traceback."""


class FromageError(Exception):
    """A problem with the user's input, files or configuration, stated so they can fix it."""
