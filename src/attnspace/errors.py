"""Errors a user can act on, and the one-line report every ``attnspace`` command ends with.

A library function that meets bad input raises :class:`AttnspaceError` (or one of its
subclasses: ``ConfigError``, ``StoreError``, ``ModelError``, ``LlamaScopeError``) with a
message naming the file or key and, in ``fix``, what to do. :func:`run_command` turns
it into one line on stderr::

    error: results/activations/m/d/L2.zarr: array 'attn_out' chunk 3 ... Fix: rm ... && snakemake

and exit status 1; ``--debug`` shows the traceback instead. Anything else that escapes
a command (a bug, an unforeseen failure) is reported on one line too, pointing at
``--debug``.
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_ERROR = 1
"""Exit status of a command refused or failed with an error."""


class AttnspaceError(Exception):
    """Bad input or state a user can fix; ``fix`` says how (may also be written into the message)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix

    def line(self) -> str:
        """The message and its fix on one line."""
        text = " ".join(str(self).split())
        if self.fix and "Fix:" not in text:
            text += f" Fix: {' '.join(self.fix.split())}"
        return text



class ConfigError(AttnspaceError, ValueError):
    """A configuration that cannot run; the message names the key and the fix."""



SAE_REFETCH = ("fetch, train or export the SAE again; the folder is damaged or was not written by a supported "
               "writer (LlamaScope layout, SAELens, llamascopium).")
"""The fix of an SAE folder that cannot be read, unless a more precise one is given."""


class LlamaScopeError(AttnspaceError, ValueError):
    """A folder that is not a valid SAE; the message names what is wrong (the fix, unless
    given, is to fetch, train or export the folder again)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix or SAE_REFETCH)


def one_line(exc: BaseException) -> str:
    """``error: ... Fix: ...`` for any exception, on one line."""
    if isinstance(exc, AttnspaceError):
        return f"error: {exc.line()}"
    text = " ".join(str(exc).split()) or "(no message)"
    if isinstance(exc, FileNotFoundError):
        return f"error: {text}. Fix: check the path, or run the rule that writes this file."
    if isinstance(exc, MemoryError):
        return "error: out of memory. Fix: give the job more memory or lower its batch size."
    if isinstance(exc, OSError):
        return f"error: {text}. Fix: check the file, the disk space and the permissions."
    return f"error: {type(exc).__name__}: {text}. Fix: rerun with --debug for the traceback, and report it."


def run_command(func: Callable[[], object], debug: bool = False) -> int:
    """Run one command; return 0, or report any error on one line (stderr) and return EXIT_ERROR.

    With ``debug`` the exception propagates with its traceback. KeyboardInterrupt and
    SystemExit (argparse's own usage errors) pass through unchanged.
    """
    if debug:
        func()
        return 0
    try:
        func()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure ends as one line
        print(one_line(exc), file=sys.stderr, flush=True)
        return EXIT_ERROR
    return 0
