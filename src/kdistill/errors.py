"""The one exception type users see, and the interrupt that keeps its work.

Every problem a user can fix (bad config key, malformed data row, missing model, ...)
is raised as ``KdistillError`` with a message that names the file, line, key or value
and what was expected. The CLI prints the message alone, without a traceback.
"""


class KdistillError(Exception):
    """A problem with the user's input that they can fix; the message says how."""


class ServerUnreachable(KdistillError):
    """A served teacher's request failed every retry; the message says how many, against which URLs."""


class ResumableInterrupt(KeyboardInterrupt):
    """Ctrl-C stopped a long phase after its work so far was kept; the same command continues it.

    The message says what was kept and where; the CLI adds the command that continues.
    """
