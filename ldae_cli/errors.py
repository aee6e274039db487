"""The one exception type users see: its message is printed as a single line, never a traceback."""


class LdaeError(Exception):
    """A problem with the user's input or environment, worded so they can fix it."""
