"""The one error for a bad user input.

Policy: every bad input (a config field, a CLI flag, a tracking URI, a storage path, a data file, a Ray address,
a capacity request) is refused before any work starts, by a ``UserError`` whose message is one sentence that names
the field, flag or path, quotes the value where it helps, and says what would be valid. The CLI prints that
sentence as one line and exits 2, never with a traceback. ``config.ConfigError`` is the config tree's kind of
``UserError``; everything else raises ``UserError`` itself.
"""


class UserError(ValueError):
    """A bad input, explained in one sentence that names the field, flag or path and what would be valid."""
