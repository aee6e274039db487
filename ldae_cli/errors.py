"""The one exception type users see: its message is printed as a single line, never a traceback."""


class LdaeError(Exception):
    """A problem with the user's input or environment, worded so they can fix it."""


class Finished(Exception):
    """The run asked for has finished already (`--continue`): the command ends successfully, saying so."""


def short(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 200 characters."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which stops cleanly by itself): ends a command like Ctrl-C, in one line."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after saving what it had: `str()` is the one line to print (what was
    kept, how to continue), `code` the exit status (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int, signal_name: str = ""):
        super().__init__(message)
        self.code, self.signal_name = code, signal_name
