"""Files written so that neither a reader nor a crash ever meets half of one."""
import contextlib
import os
import shutil

from utils.errors import UserError, WriteFailed


@contextlib.contextmanager
def atomic_path(path, what="", fix="choose a writable folder", durable=False):
    """Yield a temporary path beside ``path``; once the block has written it, it replaces ``path``.

    ``path`` thus holds its previous content or the complete new one, never a partial file, whatever
    happens meanwhile. The temporary name is hidden (``.name.PID.tmp``), so globs for the real files
    skip it, and it is removed if the block fails. The folder is created when missing.

    Args:
        path: the file to write.
        what: how error messages name the file ("checkpoint ", "the plot ").
        fix: what the user can do about a failed write, for the error message.
        durable: flush the data and the rename to disk before returning (checkpoints).

    Raises:
        WriteFailed: an OSError (a folder that cannot be written, a full disk): one line naming ``path``,
            the reason, the space left on its disk and ``fix``; exit code 1.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        yield temporary
        if durable:
            _fsync(temporary, os.O_RDWR)
        os.replace(temporary, path)
        if durable:
            with contextlib.suppress(OSError):  # not every platform lets a folder be opened for this
                _fsync(folder, os.O_RDONLY)
    except OSError as err:
        reason = err.strerror or str(err)
        with contextlib.suppress(OSError):  # first, so that the space it held counts as free
            os.remove(temporary)
        raise WriteFailed(f"cannot write {what}{path} ({reason}; {free_space(folder)} free on its disk); {fix}; "
                          f"the files written before are unchanged") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def free_space(folder):
    """The space left on the disk of ``folder`` (or of its nearest existing parent), e.g. "1.4 GiB"."""
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def _fsync(path, flags):
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_writable(folder, name, fix):
    """Fail early, before any work, when ``folder`` cannot be created or written.

    Args:
        folder: the output folder; it may not exist yet (then its nearest existing parent is checked).
        name: how the message names it, e.g. "--out" or "save_dir".
        fix: what the user can do, e.g. "pass --out with a writable folder".
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{name} {folder}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} {folder}: {existing} is not writable; {fix}")
