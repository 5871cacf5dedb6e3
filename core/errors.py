"""User-facing errors and the CLI wrapper that prints them as one line (torch-free).

Anything a user can cause (bad paths, corrupt files, impossible options, a missing extra)
raises a ``UserError`` subclass; every CLI entry point is wrapped in ``cli_errors`` so it
prints ``error: <message>`` on one line and exits non-zero instead of a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys


class UserError(Exception):
    """An error the user can fix; its message is one line that names the bad value."""

    exit_code = 1


class OutputError(UserError):
    """An output folder or file cannot be created or written (permissions, disk full)."""


class MissingExtraError(UserError):
    """An optional dependency group is not installed."""

    exit_code = 2

    def __init__(self, command: str, extra: str, module: str):
        super().__init__(f"{command} needs the '{extra}' extra ({module} is not installed): {install_hint(extra)}")


DISTRIBUTION = "ssd-diffusion"


def install_hint(extra: str) -> str:
    """How to install an extra, for wheel users and for a source checkout."""
    if extra in ("cpu", "gpu"):
        other = "gpu" if extra == "cpu" else "cpu"
        return (f"pip install '{DISTRIBUTION}[{extra}]' (ONNX Runtime for {extra.upper()}; "
                f"not together with [{other}]; in a source checkout: pip install -e '.[{extra}]')")
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a source checkout: pip install -e '.[{extra}]')"


def require(module: str, command: str, extra: str):
    """Import ``module`` or raise ``MissingExtraError`` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(command, extra, module) from None


def cli_errors(main):
    """Run a CLI ``main``; print user errors and OS errors as one line, exit non-zero.
    Output to a closed pipe (``| head``) is dropped without failing the command."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with pipe_safe_output():
                return main(*args, **kwargs)
        except UserError as err:
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as err:  # disk full, permissions: name the file, not the stack
            where = f" ({err.filename})" if err.filename else ""
            _fail(f"{err.strerror or err}{where}", 1)

    return wrapper


def _fail(message: str, code: int):
    try:
        print(f"error: {one_line(message) or 'failed'}", file=sys.stderr)
    except BrokenPipeError:
        pass
    sys.exit(code)


MAX_WORD = 120  # longer words (a 5000-digit --seed) are cut in messages


def one_line(message: str) -> str:
    """``message`` on one line: line breaks (a path may hold one) shown as ``\\n``, and any
    word longer than ``MAX_WORD`` characters cut."""
    words = message.replace("\r", "\\r").replace("\n", "\\n").split(" ")
    return " ".join(w if len(w) <= MAX_WORD else f"{w[:MAX_WORD // 2]}...({len(w)} characters)" for w in words)


class _PipeSafe:
    """A text stream that, once its reader has gone (a closed pipe), drops further output
    instead of failing the command: the files a command writes never depend on who reads
    its messages."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        """Point the stream's file descriptor at /dev/null, so later writes and the final
        flush at exit succeed."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_output():
    """Within the block, ``sys.stdout`` and ``sys.stderr`` survive a closed pipe."""
    saved = sys.stdout, sys.stderr
    if isinstance(sys.stdout, _PipeSafe):  # nested
        yield
        return
    sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


def run_cli(command, args=None, prog_name: str | None = None):
    """Run a click ``command`` so that its usage errors are one line too (exit 2).

    For console-script entry points: ``def main(): run_cli(command)``; the command's own
    body should still be wrapped in :func:`cli_errors`.
    """
    import click

    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)
