"""Atomic writes: readable like any file (the umask decides the mode), and stale temporaries cleaned, only ours."""

import os
import subprocess
import sys
import time

import pytest
import torch

from t2i_ds.atomic import _host, atomic_open, atomic_path, atomic_write_bytes, clean_stale_temporaries


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_mode_follows_the_umask_like_open(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that opens the temporary itself (torch.save, np.savez)
        tmp.write_bytes(b"y")
    with atomic_path(tmp_path / "c.safetensors") as tmp:  # one that replaces it with a private file of its own
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(tmp))
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"z")
    names = ["a.bin", "b.bin", "c.safetensors", "plain.bin"]
    for name in names:
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(mode), name
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary left


def test_replacing_keeps_the_content_atomic_and_removes_the_temporary_on_error(tmp_path):
    target = tmp_path / "t.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_clean_stale_temporaries_removes_only_dead_writers_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = _host()
    stale = [tmp_path / f".tokens-000001.stats.json.{host}.{dead_pid}.0123abcd.tmp",
             tmp_path / f".tokens-000001.tar.{host}.{dead_pid}.89abcdef.tmp"]
    old_other_host = tmp_path / f".manifest.json.otherhost.{os.getpid()}.01234567.tmp"
    kept = [tmp_path / f".tokens-000002.tar.{host}.{os.getpid()}.0123abcd.tmp",  # a live writer: this process
            tmp_path / f".tokens-000002.tar.otherhost.{dead_pid}.0123abcd.tmp",  # another host, recent: unknown
            tmp_path / ".notes.tmp", tmp_path / "tokens-000001.tar", tmp_path / ".tokens-000001.tar.x.tmp"]
    for p in stale + kept + [old_other_host]:
        p.write_bytes(b"")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_other_host, (day_ago, day_ago))  # older than a day: stale wherever its writer was
    os.utime(kept[-1], (day_ago, day_ago))  # not our name pattern: kept however old
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale + [old_other_host])
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_a_temporary_in_use_survives_cleaning(tmp_path):
    with atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"data")
        assert clean_stale_temporaries(tmp_path) == [] and tmp.exists()
    assert (tmp_path / "x.bin").read_bytes() == b"data"
