"""The one exception type a user is meant to see.

Anything raised as ``UserError`` is a mistake in the input (a missing folder, an unreadable
image, an unknown backbone) rather than a bug; the CLI prints its message on one line and exits
with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    exit_code = 2
