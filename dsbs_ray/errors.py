"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong counts).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
