"""The one exception type for problems a user can fix (bad input, mismatched artifacts)."""


class KnnlmError(Exception):
    """A user-fixable problem. The message names the file or option and the fix.

    The ``knnlm`` command prints it as one line and exits with status 2.
    """
