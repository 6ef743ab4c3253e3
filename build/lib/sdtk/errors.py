"""One error family for everything a user can act on.

Every message names the file and the problem in one line; the CLI prints it without a traceback
and exits with the error's exit code (documented in the README).
"""
from __future__ import annotations

import os

# Exit codes, shared by every command (README "Exit codes").
EXIT_OK = 0
EXIT_PROBLEMS = 1  # the command ran; it found problems (unsafe file in `scan`, defects in `inspect`)
EXIT_BAD_INPUT = 2  # unreadable, malformed, hostile or missing input; refused options; write failed
EXIT_INTERRUPTED = 130


class SdtkError(Exception):
    """Base of all errors sdtk raises on purpose. `str(err)` is the one-line message."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, path: "os.PathLike[str] | str | None", problem: str):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class FormatError(SdtkError):
    """The file is not a well-formed model file of the format it claims to be (truncated, corrupt)."""


class UnsupportedFormatError(SdtkError):
    """A format we recognise and refuse by name (TorchScript, torch tar format) or do not know."""


class UnsafeFileError(SdtkError):
    """The file tries to do something a tensor file never needs (a global outside the allowlist,
    a zip trick). Reading stopped; nothing the file names was imported or called."""


class OutputError(SdtkError):
    """Writing the output failed or was refused (exists, is an input, disk full). Nothing was left behind."""


class UsageError(SdtkError):
    """Conflicting or invalid options."""
