"""Small file helpers shared by the checkpointer, the data layer and the tools."""
import os


def write_atomic(path, write, mode="wb"):
    """``write(file)`` into a temporary name, fsync, then rename over ``path``: readers see the old file or
    the whole new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
