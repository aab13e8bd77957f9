"""What keeps bad files and interrupted runs from doing harm, kept apart from the method so that a reader of
the paper never steps over it: the error class for bad input, the lock on an output folder, atomic writes,
a pickle reader that admits only numpy arrays, archive member checks and a checksummed download."""
import atexit
import contextlib
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request


class BadInput(ValueError):
    """Input a run cannot use (a file, a folder, a flag value) or a run that cannot go on; the scripts print
    it as one line, `error: ...`, and exit with status 2."""


class Interrupted(Exception):
    """Ctrl-C in a training loop, with what was kept; the scripts print it as one line and exit with 130."""


def kept_checkpoint(saved, path, every):
    """What a stopped training loop leaves: the checkpoint of step `saved` (None: none yet)."""
    if saved is None:
        return f"no checkpoint was written yet (one every {every} steps)"
    return f"the checkpoint of step {saved} is kept in {path}; --resume continues from it"


@contextlib.contextmanager
def on_interrupt(account):
    """Ctrl-C inside the block becomes Interrupted(account()): at which step, and which checkpoint is kept."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(account()) from None


# ----------------------------------------------------------------------------------------------
# Writing: whole files or none, one run per output folder
# ----------------------------------------------------------------------------------------------


def write_atomic(path, write, mode="wb"):
    """write(f) into path.tmp, then rename: readers see the old file or the new one, never half of one.
    Every file this repository writes goes through here. A failed write leaves no temporary file behind,
    and a full disk, a read-only folder or a path under a file ends in one line naming the path."""
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
        if isinstance(e, OSError) or isinstance(e, RuntimeError) and "PytorchStreamWriter" in str(e):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:100]
            raise BadInput(f"cannot write {path} ({why}); nothing half-written was left there") from None
        raise


def lock_folder(path):
    """Lock an output folder for this process: a second run into it is refused, not interleaved. A lock
    left behind by a killed run (its process is gone) is taken over. The lock goes when the process ends."""
    lock = os.path.join(path, ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(lock)
            if pid == os.getpid():
                return
            if pid is not None and process_alive(pid):
                raise BadInput(f"--out {path}: another run (pid {pid}) is writing there; wait for it or choose "
                               "another --out") from None
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


# ----------------------------------------------------------------------------------------------
# Reading untrusted files
# ----------------------------------------------------------------------------------------------


class NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they hold (numpy arrays), so a file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_from_tar(archive, members, what):
    """Read members straight from the archive: nothing is extracted, so no member can write outside it.
    An archive that holds a member with an absolute path, a `..` or a link is refused all the same: the
    real archives this repository reads have none, so one that does was not made by their authors."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar.getmembers():
                if unsafe_member(info):
                    raise BadInput(f"{archive}: refusing an archive with the unsafe member {info.name!r} "
                                   "(absolute path, '..' or a link)")
            out = []
            names = set(tar.getnames())
            for m in members:
                if m not in names:
                    raise BadInput(f"{archive}: not the {what} (no member {m})")
                info = tar.getmember(m)
                if not info.isfile():
                    raise BadInput(f"{archive}: member {m} is not a regular file")
                out.append((tar.extractfile(info).read(), f"{archive}:{m}"))
            return out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadInput(f"{archive}: not a readable tar.gz archive ({type(e).__name__}: {e})") from None


def unsafe_member(info):
    parts = info.name.replace("\\", "/").split("/")
    return info.name.startswith(("/", "\\")) or ".." in parts or info.issym() or info.islnk()


def fetch(url, path, md5):
    """Download to path.part, check the MD5, then rename; a mismatch deletes the partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(url, part)
    except OSError as e:
        raise BadInput(f"--download: could not fetch {url} ({e})") from None
    digest = hashlib.md5(open(part, "rb").read()).hexdigest()
    if digest != md5:
        os.remove(part)
        raise BadInput(f"--download: {url} has MD5 {digest}, expected {md5}; the partial file was deleted")
    os.replace(part, path)
