"""User-facing errors: one line on stderr, a non-zero exit code, no traceback."""
import functools
import sys


class UserError(Exception):
    """A problem with the user's input (file, key, argument) that the user can fix.

    The message must name the offending file, key or argument and say what would fix it.
    """


EXIT_USER_ERROR = 2


def describe_error(err, limit=100):
    """A short account of ``err`` to quote inside a one-line UserError: an OSError's reason, else the
    first line of its message, else its type name."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cli_entry(main):
    """Decorate a script's ``main`` so that a UserError prints one line and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
