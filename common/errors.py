"""The one exception type for bad user input: its message is a single line that names the fix."""


class UserError(Exception):
    """Raised for bad input (unknown router, missing data, offline download, corrupt checkpoint, ...).

    Entry points print ``error: <message>`` and exit 2 instead of a raw traceback. Keep messages to one line
    and say what to do, e.g. "unknown position 'foo'; choose one of nope, rope, alibi, learned".
    """
