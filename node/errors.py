"""The one base class for what a user did wrong.

The CLI prints a `UserError` as one line and exits 2; anything else is a bug and is
reported as an internal error, so a bug never looks like bad input.
"""


class UserError(ValueError):
    """Bad input, a bad path or a bad setting: the message says what and where, in one sentence."""
