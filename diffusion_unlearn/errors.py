"""User-facing errors, in a module that imports nothing heavy (the CLI's parser and the configs use them)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with status 2."""


class WriteError(UserError):
    """A file could not be written (read-only place, no space, no permission); the message names path and cause."""
