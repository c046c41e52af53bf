"""The one exception family a user can cause.

Every error that bad input can trigger (a CSV row, a missing file, an unknown URI, a bad config)
raises a subclass of :class:`MococxrError` whose message says *what* is wrong and *where* (file, row,
field) and, where it helps, how to fix it. The CLI prints the message without a traceback and exits
with status 2; nothing already written or logged is removed.
"""


class MococxrError(Exception):
    """Base class of all user-facing errors."""


class DataError(MococxrError):
    """A dataset, CSV, image, split or manifest is not what was expected."""


class ConfigError(MococxrError):
    """A config file, CLI option or sweep/grid definition is invalid."""


class TrackingError(MococxrError):
    """An MLflow store, run, model URI or registry operation could not be resolved."""
