"""The one exception type for user mistakes.

Raise ``ColaprobError("one plain sentence: what is wrong and what to do")`` for anything a
user can fix (a missing or corrupt checkpoint, bad text, impossible settings). The CLI prints
the sentence and exits with status 2, without a traceback; a bug keeps its traceback.
"""


class ColaprobError(Exception):
    """A user mistake, explained in one sentence."""
