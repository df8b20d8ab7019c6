"""``python -m seqpatch``: the same command line as ``seqpatch``."""

from seqpatch.cli import app

app(prog_name="seqpatch")
