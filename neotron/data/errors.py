"""The error of the data pipeline: bad corpus files, tokenizers, damaged shards.

`DataError` is a `UsageError`, so the CLI prints its message as one line and exits with status 2
(no traceback); it is also a `ValueError`, so code that caught the `ValueError`s the pipeline
raised before keeps working. Every message is one line that names the file or the config key.
"""

from __future__ import annotations

from neotron.errors import UsageError

REBUILD_HINT = "re-run `neotron prepare --force` to rebuild it"


class DataError(UsageError, ValueError):
    """A problem with the data itself (not a malformed config), found while preparing or
    loading it."""


def reason(exc: BaseException) -> str:
    """The innermost cause of `exc` as one short line (library errors wrap the useful one)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())  # one line, whatever the library printed
    return text if len(text) <= 200 else text[:197] + "..."
