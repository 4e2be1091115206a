"""Small file helpers shared by the checkpointer, the data layer and the tools."""
import contextlib
import io
import os

__all__ = ["AtomicWriteError", "removed_on_failure", "write_atomic"]


class AtomicWriteError(OSError):
    """Writing a file failed (a full disk, a folder that cannot be written, ...).

    ``filename`` is the destination and ``errno`` the cause's (``errno.ENOSPC`` on a full disk); the message
    reads like "no space left on device while writing /x/y/rank_0.pt". When it is raised the temporary file
    is gone and a file already at the destination is untouched.
    """

    def __str__(self):
        return str(self.strerror)


class _RecordingFileIO(io.FileIO):
    """A FileIO that remembers the first OSError its ``write`` raised.

    ``torch.save`` turns an OSError from the file's ``write`` into ``RuntimeError("[enforce fail ...]
    unexpected pos ...")``, which names neither the file nor the cause; this lets the cause be reported.
    """

    error = None

    def write(self, b):
        try:
            return super().write(b)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise


def _describe(cause, path):
    reason = cause.strerror or str(cause) or type(cause).__name__
    return f"{reason[:1].lower()}{reason[1:]} while writing {path}"


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def write_atomic(path, write, mode="wb"):
    """``write(file)`` into a temporary name, fsync, then rename over ``path``: readers see the old file or
    the whole new one, never a part.

    ``mode`` is ``"wb"`` (a binary file) or ``"w"`` (UTF-8 text). On any failure the temporary file is
    removed; an OSError on the way (from ``write``, the flush, the fsync or the rename, including one that
    ``write`` itself turned into another exception, as ``torch.save`` does) is raised as
    :class:`AtomicWriteError` naming ``path`` and keeping the cause's errno. Other exceptions pass unchanged.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"write_atomic writes with mode 'wb' or 'w', not {mode!r}")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    raw = None
    try:
        raw = _RecordingFileIO(tmp, "w")
        buffered = io.BufferedWriter(raw)
        f = buffered if mode == "wb" else io.TextIOWrapper(buffered, encoding="utf-8")
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, AtomicWriteError):  # a nested write_atomic already named its file
            raise
        if isinstance(exc, OSError):
            cause = exc
        elif isinstance(exc, Exception) and raw is not None and raw.error is not None:
            cause = raw.error
        else:
            raise
        raise AtomicWriteError(cause.errno, _describe(cause, path), path) from exc


@contextlib.contextmanager
def removed_on_failure(path, *temporaries):
    """For a writer that fills its own temporary files (several files, a record writer) and renames them
    inside the block: on any failure the ``temporaries`` go, and an OSError is raised as
    :class:`AtomicWriteError` naming ``path``, as :func:`write_atomic` does."""
    try:
        yield
    except BaseException as exc:
        for tmp in temporaries:
            _remove_quietly(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, AtomicWriteError):
            raise AtomicWriteError(exc.errno, _describe(exc, path), path) from exc
        raise
