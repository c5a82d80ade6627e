"""The one exception type for problems a user can fix (bad input, mismatched artifacts)."""


class KnnlmError(Exception):
    """A user-fixable problem. The message names the file or option and the fix.

    The ``knnlm`` command prints it as one line and exits with status 2.
    """


def require_at_least(option: str, value: float | None, low: float) -> None:
    """Refuse an option below ``low`` (or not a finite number); ``None`` means "not given"."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")) or value < low:
        raise KnnlmError(f"{option} must be at least {low:g}; got {value}")
