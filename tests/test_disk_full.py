"""A full disk is reported as such, with the place and the free space, and leaves no half-written files."""

import errno

import pytest
import torch

from gdro_core.data.store import DiskFullError, atomic_write
from gdro_core.training import checkpoint


def test_a_full_disk_during_a_checkpoint_names_space_not_an_enforce_fail(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing .*step-0000003.*MiB free"):
        checkpoint.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone, older ones untouched


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("old")

    def full(p):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="table.parquet"):
        atomic_write(target, full)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_other_write_errors_pass_through(tmp_path):
    def denied(p):
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "x", denied)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 998"),
    Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
])
def test_every_writers_full_disk_text_is_recognised(tmp_path, error):
    def full(p):
        raise error

    with pytest.raises(DiskFullError, match="no space left on the device while writing .*out.safetensors"):
        atomic_write(tmp_path / "out.safetensors", full)
    assert list(tmp_path.iterdir()) == []
