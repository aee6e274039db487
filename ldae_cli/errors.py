"""The one exception type users see: its message is printed as a single line, never a traceback."""


class LdaeError(Exception):
    """A problem with the user's input or environment, worded so they can fix it."""


def short(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 200 characters."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
