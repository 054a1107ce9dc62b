"""The one exception type for bad user input (files, configs, flags).

The CLI turns a `UserError` into a one-paragraph message on stderr and a non-zero
exit code, never a traceback. Raise it with a message that names the offending
thing and says how to fix it.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is shown verbatim."""
