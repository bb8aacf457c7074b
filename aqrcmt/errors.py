"""The package's base error: every error that reports bad input (a config, a data file, a checkpoint, a results
file, a command's arguments) derives from :class:`AqrcmtError`, next to the built-in base it always had
(``ConfigError`` is still a ``ValueError``, ``BadSampleError`` a ``RuntimeError``), so a caller can tell an
expected failure from a bug with one ``except AqrcmtError``.
"""
from __future__ import annotations


class AqrcmtError(Exception):
    """Bad input detected by aqrcmt; the message names the file, field and value."""
