"""The one error type users see.

Every mistake a user can fix (bad arguments, a missing stage, an unwritable folder, a failed
upload) raises a subclass of ``SeqpatchError`` whose message says what was wrong and what to do.
The CLI turns it into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. A message never shows the Hugging Face token (``seqpatch.redact``), whatever
value of the user's carried it.
"""


class SeqpatchError(Exception):
    """A problem the user can act on; the message names it and the fix."""

    def __str__(self) -> str:
        from seqpatch.redact import redact_text

        return redact_text(super().__str__())
