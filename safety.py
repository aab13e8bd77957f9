"""What keeps bad input and interrupted runs from doing harm, kept apart from the method so that a
reader of the paper never steps over it: the error classes, atomic writes and the lock on an output
folder. (The readers of untrusted data files live with the data sets they read, in datasets.py.)"""
import atexit
import os


class BadInput(ValueError):
    """Input a run cannot use (a file, a folder, a flag value) or a run that cannot go on; the
    scripts print it as one line, `error: ...`, and exit with status 2."""


class Interrupted(Exception):
    """Ctrl-C in a training loop, with what was kept; the scripts print it as one line and exit with
    130."""


# ----------------------------------------------------------------------------------------------
# Writing: whole files or none, one run per output folder
# ----------------------------------------------------------------------------------------------


def write_atomic(path, write, mode="wb"):
    """write(f) into path.tmp, then rename: readers see the old file or the new one, never half of
    one. Every file this repository writes goes through here. A failed write leaves no temporary
    file behind, and a full disk, a read-only folder or a path under a file ends in one line naming
    the path."""
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        # torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer
        if (isinstance(e, OSError)
                or isinstance(e, RuntimeError) and "PytorchStreamWriter" in str(e)):
            why = (e.strerror if isinstance(e, OSError) and e.strerror
                   else str(e).splitlines()[0][:100])
            raise BadInput(f"cannot write {path} ({why}); nothing half-written was left "
                           "there") from None
        raise


def lock_folder(path):
    """Lock an output folder for this process: a second run into it is refused, not interleaved. A
    lock left behind by a killed run (its process is gone) is taken over. The lock goes when the
    process ends."""
    lock = os.path.join(path, ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(lock)
            if pid == os.getpid():
                return
            if pid is not None and process_alive(pid):
                raise BadInput(f"--out {path}: another run (pid {pid}) is writing there; wait for "
                               "it or choose another --out") from None
            os.remove(lock)  # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: lock_owner(lock) == os.getpid() and os.remove(lock))
        return


def lock_owner(lock):
    try:
        return int(open(lock).read())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
