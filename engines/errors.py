"""One exception type for every user-facing failure: the CLI prints its message, never a traceback.
It lives in the lowest layer so that engines can raise it; `fromage.runtime` re-exports it."""


class FromageError(Exception):
    """A problem with the user's input, files or configuration, stated so they can fix it."""


class ParameterError(FromageError):
    """A parameter out of its range. `param` names it as the Python API does (e.g. "top_p"), so that
    each front end can name it its own way (the CLI's --top-p, the server's JSON field)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message
