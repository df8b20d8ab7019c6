"""The one error type users see.

Every mistake a user can fix (bad arguments, a missing stage, an unwritable folder, a failed
upload) raises a subclass of ``SeqpatchError`` whose message says what was wrong and what to do.
The CLI turns it into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""


class SeqpatchError(Exception):
    """A problem the user can act on; the message names it and the fix."""
