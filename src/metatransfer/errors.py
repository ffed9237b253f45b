"""User-facing errors.

Anything a user can fix (bad data, bad config, bad checkpoint) is raised as an
:class:`MTLError` with a one-line message naming the cause and the fix. The CLI catches
these once and prints the message without a traceback.
"""


class MTLError(Exception):
    """A problem the user can act on; the message is shown as is."""


class DataError(MTLError):
    """Missing, malformed or insufficient data on disk."""


class ConfigError(MTLError):
    """An invalid configuration value or key."""


class CheckpointError(MTLError):
    """A missing, truncated, corrupt or incompatible checkpoint."""
