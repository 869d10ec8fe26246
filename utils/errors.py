"""User-facing errors: one line on stderr, a non-zero exit code, no traceback."""
import functools
import sys
import traceback

from utils.launch_records import is_collective_error, mark_started, write_record


class UserError(Exception):
    """A problem with the user's input (file, key, argument) that the user can fix.

    The message must name the offending file, key or argument and say what would fix it.
    """

    exit_code = 2


class WriteFailed(UserError):
    """A file that could not be written mid-run (a full disk): one line like a UserError, but exit code 1,
    as a crash, so that no scheduler reruns a run that cannot save (75 would)."""

    exit_code = 1


EXIT_USER_ERROR = UserError.exit_code


def describe_error(err, limit=100):
    """A short account of ``err`` to quote inside a one-line UserError: an OSError's reason, else the
    first line of its message, else its type name."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cli_entry(main):
    """Decorate a script's ``main`` so that a UserError prints one line and exits with its ``exit_code`` (2;
    1 for a ``WriteFailed``). Under ``utils.launch`` the line goes to the launcher, which prints it once
    for all the workers; so does the traceback of a collective that broke (most often because another
    worker died or failed first: the launcher names that one, and shows this traceback only when no
    other worker failed), and the process exits with 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        mark_started()  # under utils.launch: this attempt's records replace the last one's
        try:
            return main(*args, **kwargs)
        except UserError as err:
            line = f"error: {err}"
            if not write_record("error", line):  # under utils.launch, the launcher prints it once
                print(line, file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
        except Exception as err:
            # under utils.launch: the traceback, then its one-line summary, for the launcher
            if is_collective_error(err) and write_record(
                    "peer", f"{traceback.format_exc().rstrip()}\n{describe_error(err, limit=500)}"):
                sys.exit(1)
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
