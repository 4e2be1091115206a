"""write_atomic on a failing disk: the temporary file goes, the old file stays, the error names the file."""
import errno
import json
import os

import numpy as np
import pytest
import torch

from partialfc.engine import checkpointer as checkpoint
from partialfc.fileio import write_atomic


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def _fails_part_way(after):
    """A write callback that writes ``after`` bytes, then hits a full disk."""
    def write(f):
        f.write(b"x" * after)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def _assert_full_disk_error(exc, path):
    assert isinstance(exc, OSError)  # callers that catch OSError keep working
    assert exc.errno == errno.ENOSPC
    assert str(exc) == f"no space left on device while writing {path}"
    assert exc.filename == str(path)


def test_a_full_disk_part_way_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "rank_0.pt"
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError) as info:
        write_atomic(path, _fails_part_way(100_000))
    _assert_full_disk_error(info.value, path)
    assert path.read_bytes() == b"the previous checkpoint"
    assert _leftovers(tmp_path) == []


def test_a_new_file_that_fails_leaves_nothing(tmp_path):
    path = tmp_path / "new.bin"
    with pytest.raises(OSError, match="no space left on device while writing .*new.bin$"):
        write_atomic(str(path), _fails_part_way(10))
    assert os.listdir(tmp_path) == []


def test_fsync_and_rename_failures_name_the_destination(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("{}")

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        write_atomic(path, lambda f: json.dump({"a": 1}, f), mode="w")
    assert info.value.errno == errno.EIO
    assert str(info.value) == f"input/output error while writing {path}"
    assert path.read_text() == "{}" and _leftovers(tmp_path) == []
    monkeypatch.undo()

    folder = tmp_path / "a_folder"  # os.replace cannot put a file over a non-empty folder
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError) as info:
        write_atomic(folder, lambda f: f.write(b"data"))
    assert str(folder) in str(info.value) and info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert _leftovers(tmp_path) == [] and folder.is_dir()


def test_a_missing_folder_names_the_destination_not_the_temporary(tmp_path):
    path = tmp_path / "no_such_folder" / "out.bin"
    with pytest.raises(OSError) as info:
        write_atomic(path, lambda f: f.write(b"data"))
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == f"no such file or directory while writing {path}"
    assert ".tmp-" not in str(info.value)


def test_other_exceptions_pass_unchanged_and_still_clean_up(tmp_path):
    path = tmp_path / "model.pt"

    def buggy(f):
        f.write(b"half")
        raise KeyError("a bug in the caller")

    with pytest.raises(KeyError, match="a bug in the caller"):
        write_atomic(path, buggy)
    assert os.listdir(tmp_path) == []
    write_atomic(path, lambda f: json.dump({"name": "é"}, f), mode="w")  # and the next write goes through
    assert json.loads(path.read_text(encoding="utf-8")) == {"name": "é"} and os.listdir(tmp_path) == ["model.pt"]


# -- a real full device: /dev/full fails every write with ENOSPC ---------------------------------------------
def _point_temporary_at_dev_full(path):
    """Make ``path``'s temporary name (``<path>.tmp-<pid>``) a link to /dev/full, so the writes go there.
    Removing the link afterwards leaves /dev/full itself alone."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    os.symlink("/dev/full", f"{path}.tmp-{os.getpid()}")


WRITERS = {
    "large write": (lambda f: f.write(b"y" * (1 << 20)), "wb"),
    "small write, fails at the flush": (lambda f: f.write(b"abc"), "wb"),
    "text (json)": (lambda f: json.dump({"step": 3}, f), "w"),
    "np.save": (lambda f: np.save(f, np.arange(1000)), "wb"),
    # torch.save turns the OSError of the file's write into RuntimeError("... unexpected pos ...")
    "torch.save": (lambda f: torch.save({"weight": torch.zeros(4096)}, f), "wb"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_dev_full_gives_the_cause_and_the_file(tmp_path, writer):
    write, mode = WRITERS[writer]
    path = tmp_path / "rank_0.pt"
    path.write_bytes(b"old")
    _point_temporary_at_dev_full(path)
    with pytest.raises(OSError) as info:
        write_atomic(path, write, mode=mode)
    _assert_full_disk_error(info.value, path)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == [] and os.path.exists("/dev/full")


def test_a_rank_that_cannot_write_its_shard_leaves_no_sealed_checkpoint(tmp_path):
    """The checkpointer's files in save order, as two ranks write them; rank 1's disk is full."""
    folder = checkpoint.step_dir(str(tmp_path), 4)
    os.makedirs(folder)
    checkpoint.save_atomic({"weight": torch.ones(8)}, os.path.join(folder, "rank_0.pt"))
    shard = os.path.join(folder, "rank_1.pt")
    _point_temporary_at_dev_full(shard)
    with pytest.raises(OSError) as info:
        checkpoint.save_atomic({"weight": torch.ones(4096)}, shard)
    _assert_full_disk_error(info.value, shard)
    checkpoint.save_atomic({"step": 4}, os.path.join(folder, "trainer.pt"))
    with pytest.raises(RuntimeError, match="rank_1.pt"):  # rank 0 does not seal a checkpoint with a shard missing
        checkpoint.write_manifest(folder, 2, 4)
    assert sorted(os.listdir(folder)) == ["rank_0.pt", "trainer.pt"]  # no manifest, no temporary
    assert checkpoint.latest_complete(str(tmp_path)) is None
