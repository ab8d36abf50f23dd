"""The one exception type a user is meant to see.

Anything raised as ``UserError`` is a mistake in the input (a missing folder, an unreadable
image, an unknown backbone) rather than a bug; the CLI prints its message on one line and exits
with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    exit_code = 2


class ImageError(UserError):
    """An image that cannot be used, kept apart from other input errors so a loader can skip it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep it picklable (worker processes) despite the two-argument init
        return type(self), (self.path, self.reason)


def unreadable(path: str, exc: OSError) -> ImageError:
    """One wording for a file that cannot even be opened, whichever decoder tried."""
    reason = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory",
              PermissionError: "permission denied"}.get(type(exc))
    return ImageError(path, reason or f"cannot read ({exc.strerror or type(exc).__name__})")
