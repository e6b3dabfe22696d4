"""A trainer that never lies and never loses a run (issue 14): each case reproduced, answered with one line,
nothing lost, or the documented fallback.

Config values and command arguments are checked where they enter, and the checks a start makes before
DeepSpeed exists (JIT build locks, the run directory's lock, the checkpoint to resume verified against its
manifest, the config compared with the run's) run in `t2i_ds.train.main` in this process. The multi-rank cases
share two CPU ranks started once for the module (tests/rank_workers.py: the real DeepSpeed engine over gloo);
one test goes through the DeepSpeed launcher for what the user sees on screen.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_ds import train
from t2i_ds.trainer import checkpointing, jit_cache, rundir
from t2i_ds.trainer.agree import Agreement
from tests.rank_workers import Ranks, train_main
from tests.trainer_utils import DS_ZERO0, DS_ZERO2, ROOT, losses, metrics, write_random_shards, zero_checkpoint_state
from tests.trainer_utils import train as launch

DEBUG = ["--ds_config", DS_ZERO2, "--preset", "debug"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def one_error_line(err: str, prog: str = "t2i_ds.train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def fails_in_process(capsys, argv: list[str]) -> str:
    """train.main(argv) must stop with exit status 2 and exactly one line, before DeepSpeed starts."""
    code = train.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    return one_error_line(err)


# ---- the ranks and one shared checkpointed run ----------------------------------------------------
@pytest.fixture(scope="module")
def ranks():
    r = Ranks(2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def base_run(ranks, tmp_path_factory) -> Path:
    """2 ZeRO-2 ranks, 6 steps, checkpoints at 2, 4, 6 (copied and damaged by the tests)."""
    run = tmp_path_factory.mktemp("base") / "run"
    results = ranks.run(train_main, argv=[*DEBUG, *sets(f"train.run_dir={run}", "train.ckpt_every=2", "train.keep_last=5")])
    assert [r["code"] for r in results] == [0, 0], results
    assert [p.name for p in checkpointing.complete_checkpoints(run / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000006"]
    assert not (run / rundir.LOCK).exists()  # released at the end
    return run


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


# ---- silent wrong results: config values and command arguments --------------------------------------
@pytest.mark.parametrize("overrides,expect", [
    (["train.steps=-3"], "train.steps=-3 must be >= 1 (or null: derived from train.total_tokens)"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
    (["train.steps=2.5"], "train.steps=2.5 is not an integer"),
    (["train.steps=abc"], "train.steps='abc' is not an integer"),
    (["optim.lr=abc"], "optim.lr='abc' is not a number"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["optim.lr=NaN"], "optim.lr=nan must be a finite number"),
    (["model.grad_checkpointing=1"], "model.grad_checkpointing=1 is not true or false"),
    (["train.sample_cfg_scale=-2"], "train.sample_cfg_scale=-2.0 must be >= 0"),
    (["data.path=/does/not/exist"], "data.path='/does/not/exist' is ignored with train.data_source='synthetic'"),
    (["init.checkpoint=/x.pt"], "init.checkpoint and init.new_rows are read only with init.mode='pretrained'"),
    (["model.overrides.dim=abc"], "model.overrides.dim='abc' is not an integer"),
])
def test_set_values_are_converted_or_refused(capsys, tmp_path, overrides, expect):
    line = fails_in_process(capsys, [*DEBUG, *sets(f"train.run_dir={tmp_path / 'run'}", *overrides)])
    assert expect in line
    assert not (tmp_path / "run").exists()


def test_set_values_convert_to_the_declared_type():
    from t2i_ds.config import apply_overrides, preset

    cfg = apply_overrides(preset("debug"), ["train.steps=1e1", "optim.lr=1", "train.data_source=shards",
                                            "data.path=123", "model.overrides.attn_backend=sdpa"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.data.path) == (10, 1.0, "123")
    assert type(cfg.train.steps) is int and type(cfg.optim.lr) is float
    assert apply_overrides(preset("debug"), ["train.steps=null"]).train.steps is None  # derived, and said so in the log


def _prepare_parse(argv):
    from t2i_ds.prepare import parse_args

    return parse_args(["--input", "x", "--out", "y", *argv])


def _generate_parse(argv):
    from t2i_ds.generate import parse_args

    return parse_args(["--checkpoint", "run", "--captions", "a", "--out", "g.png", *argv])


def _eval_parse(argv):
    from t2i_ds.eval.__main__ import parse_args

    return parse_args(["fid", "--run", "r", "--captions", "c", "--reference", "ref", "--inception", "i", "--out", "o", *argv])


def _align_parse(argv):
    from t2i_ds.paper.align import parse_args

    return parse_args(["--shards", "s", "--checkpoint", "c", "--out", "o", *argv])


def _export_parse(argv):
    from t2i_ds.export import parse_args

    return parse_args(["--run-dir", "r", *argv])


@pytest.mark.parametrize("parse,prog,argv,expect", [
    (_generate_parse, "t2i_ds.generate", ["--cfg_scale", "-2"], "argument --cfg_scale: must be >= 0, got -2"),
    (_generate_parse, "t2i_ds.generate", ["--top_k", "0"], "argument --top_k: must be >= 1 or 'none', got 0"),
    (_generate_parse, "t2i_ds.generate", ["--top_k", "-5"], "argument --top_k: must be >= 1 or 'none', got -5"),
    (_generate_parse, "t2i_ds.generate", ["--temperature", "0"], "argument --temperature: must be > 0"),
    (_eval_parse, "t2i_ds.eval fid", ["--cfg_scale", "-2"], "argument --cfg_scale: must be >= 0, got -2"),
    (_eval_parse, "t2i_ds.eval fid", ["--top_k", "0"], "argument --top_k: must be >= 1 or 'none'"),
    (_align_parse, "t2i_ds.paper.align", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (_align_parse, "t2i_ds.paper.align", ["--lr", "abc"], "argument --lr: 'abc' is not a number"),
    (_prepare_parse, "t2i_ds.prepare", ["--image-tokenizer", "movqgan:m", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (_prepare_parse, "t2i_ds.prepare", ["--image-tokenizer", "nokind:m"], "unknown image tokenizer kind 'nokind'"),
    (_export_parse, "t2i_ds.export", ["--format", "open_lm", "--out", "model.bin"], "model.bin must end in .pt"),
    (_export_parse, "t2i_ds.export", ["--format", "hf", "--out", "model.pt"], "model.pt must not end in .pt"),
])
def test_command_arguments_are_checked(capsys, parse, prog, argv, expect):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: its usage line, then the error
    assert last.startswith(f"{prog}: error: ") and expect in last, last


def test_top_k_none_and_in_range_values_pass():
    assert _generate_parse(["--top_k", "none"]).top_k is None and _generate_parse(["--top_k", "7"]).top_k == 7
    assert _eval_parse(["--top_k", "none", "--cfg_scale", "0"]).top_k is None


# ---- prepare: missing input, --out a file, --out read-only ------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def _prepare_fails(capsys, argv) -> str:
    from t2i_ds import prepare
    from t2i_ds.cli import run

    with pytest.raises(SystemExit) as exit_:
        run("t2i_ds.prepare", lambda: prepare.main([*argv, "--image-tokenizer", "movqgan:/no/tokenizer"]))
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err, "t2i_ds.prepare")


def test_prepare_refuses_a_missing_input_without_creating_out(capsys, tmp_path):
    line = _prepare_fails(capsys, ["--input", str(tmp_path / "noinput"), "--out", str(tmp_path / "out")])
    assert f"--input {tmp_path / 'noinput'} does not exist" in line and "token shards" not in line
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_out_that_is_a_file_or_read_only(capsys, tmp_path, readonly_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    line = _prepare_fails(capsys, ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file, not a directory" in line
    line = _prepare_fails(capsys, ["--input", str(tmp_path / "in"), "--out", str(readonly_dir / "tokens")])
    assert f"--out {readonly_dir / 'tokens'} cannot be written" in line


# ---- image tars given as token data ---------------------------------------------------------------
def test_image_tars_as_token_data_name_the_shard(capsys, tmp_path):
    import io
    import tarfile

    tars = tmp_path / "images"
    tars.mkdir()
    with tarfile.open(tars / "00000.tar", "w") as tar:
        for name, data in (("k0.jpg", b"\xff\xd8 not really a jpeg"), ("k0.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    line = fails_in_process(capsys, [*DEBUG, *sets("train.data_source=shards", f"data.path={tars}",
                                                   f"train.run_dir={tmp_path / 'run'}")])
    assert f"{tars / '00000.tar'} holds images (.jpg), not token shards" in line and "t2i_ds.prepare" in line


# ---- the JIT op cache --------------------------------------------------------------------------------
def test_a_killed_jit_build_lock_is_removed_and_the_op_rebuilt(tmp_path, monkeypatch):
    """A lock no process holds (a build killed part-way) is removed with one line, at once, so torch's FileBaton
    builds instead of waiting forever; a live build's lock, another local rank, several nodes: nothing removed."""
    import time

    from torch.utils.file_baton import FileBaton

    lock = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("CROSS_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    killed = subprocess.run([sys.executable, "-c", f"import os; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); "
                             "os.kill(os.getpid(), 9)"])  # torch's FileBaton.try_acquire, then SIGKILL
    assert killed.returncode == -9 and lock.is_file()
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the node's first process: leaves it to local rank 0
    assert jit_cache.check_build_locks(warn=pytest.fail) == [] and lock.is_file()
    monkeypatch.setenv("CROSS_SIZE", "2")  # several nodes: the holder may be elsewhere, so a warning
    warned = []
    assert jit_cache.check_build_locks(warn=warned.append) == [] and lock.is_file()
    assert len(warned) == 1 and str(lock) in warned[0] and "another node" in warned[0]
    monkeypatch.delenv("CROSS_SIZE")
    monkeypatch.setenv("LOCAL_RANK", "0")
    fd = os.open(lock, os.O_RDONLY)  # a live build holds its lock open: wait for it, say nothing
    try:
        assert jit_cache.check_build_locks(warn=pytest.fail) == [] and lock.is_file()
    finally:
        os.close(fd)
    warned, t0 = [], time.monotonic()
    assert jit_cache.check_build_locks(warn=warned.append) == [lock]
    assert time.monotonic() - t0 < 5 and not lock.exists()
    assert warned == [f"[t2i_ds] removed {lock}: a JIT build lock that no process holds (a build killed part-way "
                      "left it); the op is built again now instead of waited on"]
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # the next build takes the lock and builds
    baton.release()


def test_a_build_lock_released_while_looked_at_is_not_stale(tmp_path, monkeypatch):
    """Torch closes a finished build's lock, then removes it: a rank checking in between (another rank of the same
    launch loading its op) looks again before calling it stale."""
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")  # closed, not yet removed
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(jit_cache.time, "sleep", lambda s: lock.unlink())  # ... and removed while we wait
    monkeypatch.delenv("CROSS_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert jit_cache.check_build_locks(warn=pytest.fail) == []  # nothing called stale, nothing said


def test_entry_point_keeps_the_jit_cache_in_this_environment(monkeypatch, capsys):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert train.main([*DEBUG, "--dry-run"]) == 0
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")


def test_jit_builds_use_this_environments_ninja(monkeypatch):
    """torch runs the first `ninja` on PATH; the venv's (the lock's) must win over the system's, activated or not
    (two versions discard each other's build log: every op rebuilt at each switch)."""
    import shutil

    venv_ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.path.isfile(venv_ninja):
        pytest.skip("this environment has no ninja of its own")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell that did not activate the venv
    assert train.main([*DEBUG, "--dry-run"]) == 0
    assert shutil.which("ninja") == venv_ninja
    path = os.environ["PATH"]
    jit_cache.use_own_cache()  # twice: PATH is not extended again
    assert os.environ["PATH"] == path


# ---- one run per directory ------------------------------------------------------------------------------
def test_a_second_training_into_a_live_run_directory_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    holder = rundir.RunLock(run)  # a live training (this process) holds the directory
    try:
        line = fails_in_process(capsys, [*DEBUG, *sets(f"train.run_dir={run}")])
    finally:
        holder.release()
    assert f"{run} is in use by another training, pid {os.getpid()} on {socket.gethostname()}" in line
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written by the refused one


def _lock_naming(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(exist_ok=True)
    (run / rundir.LOCK).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "time": 0}))


def test_a_lock_nobody_holds_is_taken_over_saying_what_was_found(tmp_path):
    """The lock file names a pid, but nobody holds the flock: taken over, and the line says whether that pid is
    dead, alive but not a training of this directory (pid reuse, a copied directory), on another host, or ours."""
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen(["sleep", "30"])  # a live process that is not a trainer
    try:
        cases = {int(dead.stdout): "which is no longer alive (a training that was killed)",
                 alive.pid: "which is alive but does not hold the lock, so it is not a training of this directory",
                 os.getpid(): "which is this process"}
        for pid, why in cases.items():
            _lock_naming(run, pid)
            rundir.check_not_busy(run)  # no live holder
            lock = rundir.RunLock(run)
            print(lock.stale)
            assert lock.stale.startswith(f"took over the run directory's lock: {run / rundir.LOCK} named pid {pid} on "
                                         f"{socket.gethostname()} (since ") and why in lock.stale
            assert "no longer alive" not in lock.stale or pid == int(dead.stdout)
            lock.release()
    finally:
        alive.kill()
        alive.wait()
    _lock_naming(run, os.getpid(), host="elsewhere")
    lock = rundir.RunLock(run)
    assert "named pid" in lock.stale and "on elsewhere" in lock.stale and "holds no lock on it" in lock.stale
    lock.release()


class _CkptEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class FakeEngine:
    """The part of DeepSpeed's engine that `checkpointing.save` drives, writing one real 1.2 MB torch file."""

    def __init__(self):
        self.checkpoint_engine = _CkptEngine()

    def _copy_recovery_script(self, save_path):
        pass

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.checkpoint_engine.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": torch.arange(300_000.0), **client_state},
                                    os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        self._copy_recovery_script(save_dir)


def _save(root, step, run_id="A", keep_last=5):
    return checkpointing.save(FakeEngine(), root, step, {"step": step}, {"data": {}}, keep_last, 0, 1, run_id,
                              Agreement(0, 1))


def test_keep_last_and_existing_tags_only_concern_this_run(tmp_path):
    root = tmp_path / "checkpoints"
    other = _save(root, 5, run_id="B")
    for step in (2, 4, 6):
        _save(root, step, keep_last=2)
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step_00000004", "step_00000005", "step_00000006"]
    assert checkpointing.verify(other) is None  # another run's checkpoint is never pruned ...
    with pytest.raises(checkpointing.CheckpointError, match="complete checkpoint of another run"):
        _save(root, 5)  # ... nor overwritten
    assert checkpointing.verify(other) is None


def test_a_failed_write_names_the_os_error_and_keeps_the_previous_checkpoint(tmp_path):
    """A real OS error from torch's own writer (RLIMIT_FSIZE: "File too large", as a full disk gives "No space left
    on device"): torch reports "unexpected pos ..."; the save names the file and the OS error."""
    root = tmp_path / "checkpoints"
    good = _save(root, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(checkpointing.CheckpointError) as failed:
            _save(root, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failed.value)
    print(message)
    assert message.startswith(f"checkpoint step_00000004 not saved: {root / 'step_00000004' / 'mp_rank_00_model_states.pt'}: "
                              f"[Errno {errno.EFBIG}] File too large; removed the partial directory; "
                              f"the newest complete checkpoint is {good}")
    assert not (root / "step_00000004").exists() and checkpointing.verify(good) is None
    assert _save(root, 4) == root / "step_00000004"  # space again: the retry in place works


def test_a_damaged_checkpoint_is_moved_aside_and_not_counted_by_keep_last(tmp_path):
    """keep_last=2 after a fallback from a damaged step 6 to step 4: the damaged one goes aside (no lister takes it
    for a checkpoint again), and the next save keeps the intact step 4 rather than the damaged one."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(root, step, keep_last=3)
    _truncate(root / "step_00000006" / "rank_00000.pt")
    chosen, damaged = checkpointing.choose_resume("auto", root)
    assert chosen == root / "step_00000004" and [(p.name, "the manifest says" in why) for p, why in damaged] == [
        ("step_00000006", True)]
    aside = checkpointing.move_aside(*damaged[0])
    assert aside == root / "damaged-step_00000006" and checkpointing.verify(aside) is not None  # kept as it was
    assert "rank_00000.pt has" in json.loads((aside / checkpointing.DAMAGED).read_text())["problem"]
    _save(root, 5, keep_last=2)
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step_00000004", "step_00000005"]
    assert checkpointing.find_resume("auto", root, warn=pytest.fail) == root / "step_00000005"
    _truncate(root / "step_00000005" / "rank_00000.pt")  # damaged again at the same tag: a second name, nothing lost
    assert checkpointing.move_aside(root / "step_00000005", "x") == root / "damaged-step_00000005"
    _save(root, 5, keep_last=2)
    _truncate(root / "step_00000005" / "rank_00000.pt")
    assert checkpointing.move_aside(root / "step_00000005", "x") == root / "damaged-step_00000005.2"


def test_nothing_to_train_says_so_and_leaves_the_run_directory_as_it_was(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")

    def snapshot():
        return {str(p.relative_to(run)): (p.read_bytes() if p.is_file() else None) for p in sorted(run.rglob("*"))}

    before = snapshot()
    for steps in (6, 4):  # the run's own last step, and a lowered train.steps
        assert train.main([*DEBUG, *sets(f"train.run_dir={run}", f"train.steps={steps}")]) == 0
        out, err = capsys.readouterr()
        assert err == "" and out == (
            f"[t2i_ds] nothing to train: the checkpoint to resume, {run / 'checkpoints' / 'step_00000006'}, is at step 6 "
            f"and train.steps={steps}; trained nothing and left {run} as it was (set train.steps above 6 to train "
            "further, or choose another train.run_dir)\n")
        assert snapshot() == before


@pytest.fixture
def full_fs(tmp_path):
    """A 2 MiB tmpfs: room for one FakeEngine checkpoint (1.2 MB), not two (a disk that fills up for real)."""
    d = tmp_path / "fs"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                                           capture_output=True).returncode:
        pytest.skip("needs the right to mount a small tmpfs")
    yield d
    subprocess.run(["umount", "--lazy", str(d)], check=True)  # lazy: torch's failed writer may still hold its file


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["model file", "rank file", "COMPLETE marker"])
def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_resumable(request, tmp_path, monkeypatch, where):
    """ENOSPC at each write of a save: one line naming the file and the error, the partial directory gone (nothing
    that looks complete), the previous checkpoint the one a resume takes. The model file fills a real small tmpfs."""
    root = (request.getfixturevalue("full_fs") if where == "model file" else tmp_path) / "checkpoints"
    good = _save(root, 2)
    if where == "rank file":
        monkeypatch.setattr(checkpointing, "atomic_save", _enospc)
    elif where == "COMPLETE marker":
        monkeypatch.setattr(checkpointing, "atomic_write_text", _enospc)
    with pytest.raises(checkpointing.CheckpointError) as failed:
        _save(root, 4)
    path = root / "step_00000004" / {"model file": "mp_rank_00_model_states.pt", "rank file": "rank_00000.pt",
                                     "COMPLETE marker": checkpointing.MARKER}[where]
    assert str(failed.value) == (f"checkpoint step_00000004 not saved: {path}: [Errno {errno.ENOSPC}] No space left on "
                                 f"device; removed the partial directory; the newest complete checkpoint is {good}")
    assert not (root / "step_00000004").exists() and sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert checkpointing.find_resume("auto", root, warn=pytest.fail) == good and checkpointing.verify(good) is None


# ---- resume: config, damaged checkpoints, fallback ---------------------------------------------------
def test_resume_with_another_model_writes_nothing(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    before = {f: (run / f).read_bytes() for f in ("config.json", "plan.json", "metrics.jsonl", "run.json")}
    line = fails_in_process(capsys, [*DEBUG, *sets(f"train.run_dir={run}", "model.preset=demo")])
    assert f"cannot resume {run} with a different model.preset: 'debug' -> 'demo'" in line
    assert {f: (run / f).read_bytes() for f in before} == before and not (run / rundir.LOCK).exists()


def test_resume_never_into_a_run_with_checkpoints_is_refused(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    line = fails_in_process(capsys, [*DEBUG, *sets(f"train.run_dir={run}", "train.resume=never")])
    assert "train.resume=never, but" in line and "step_00000006" in line


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model file": ("mp_rank_00_model_states.pt", _truncate, "the manifest says"),
    "truncated optimizer file": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", _truncate, "the manifest says"),
    "missing ZeRO partition": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", Path.unlink, "is missing"),
    "truncated rank_00000.pt": ("rank_00000.pt", _truncate, "the manifest says"),
    "missing rank_00001.pt": ("rank_00001.pt", Path.unlink, "is missing"),
    "altered model file": ("mp_rank_00_model_states.pt", _flip, "fails its checksum"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_names_its_file_and_falls_back(base_run, tmp_path, kind):
    name, damage, reason = DAMAGE[kind]
    root = copy_run(base_run, tmp_path / "run") / "checkpoints"
    damage(root / "step_00000006" / name)
    warnings = []
    assert checkpointing.find_resume("auto", root, warn=warnings.append) == root / "step_00000004"
    assert len(warnings) == 1 and f"step_00000006 is damaged ({name} " in warnings[0] and reason in warnings[0]
    assert "resuming from the previous complete checkpoint step_00000004" in warnings[0]
    with pytest.raises(checkpointing.CheckpointError, match=f"{name} "):  # an explicit path never falls back
        checkpointing.find_resume(str(root / "step_00000006"), root)


def test_no_intact_checkpoint_stops_with_one_line_before_writing(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    for step in (2, 4, 6):
        (run / "checkpoints" / checkpointing.tag_for(step) / "rank_00001.pt").unlink()
    config = (run / "config.json").read_bytes()
    line = fails_in_process(capsys, [*DEBUG, *sets(f"train.run_dir={run}")])
    assert "no intact checkpoint to resume" in line and "step_00000002 is damaged (rank_00001.pt is missing)" in line
    assert (run / "config.json").read_bytes() == config


def test_fallback_resume_continues_the_run_exactly(ranks, base_run, tmp_path):
    """The newest checkpoint lost rank 1's file: one warning line, resume from the one before, the same losses as
    the uninterrupted run, and metrics.jsonl holds each step once."""
    run = copy_run(base_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000006" / "rank_00001.pt").unlink()
    results = ranks.run(train_main, argv=[*DEBUG, *sets(f"train.run_dir={run}", "train.ckpt_every=2", "train.keep_last=5")])
    assert [r["code"] for r in results] == [0, 0], results
    warnings = [line for r in results for line in r["stdout"].splitlines() if "warning" in line]
    aside = run / "checkpoints" / "damaged-step_00000006"
    assert warnings == [f"[t2i_ds rank 0] warning: step_00000006 is damaged (rank_00001.pt is missing), moved aside to {aside} "
                        "(kept for inspection; never resumed, listed or counted by keep_last): resuming from the "
                        "previous complete checkpoint step_00000004"], warnings
    assert (aside / "rank_00000.pt").is_file() and not (aside / "rank_00001.pt").exists()
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert losses(run) == losses(base_run)  # bit-exact: steps 5 and 6 again from step 4
    assert checkpointing.verify(run / "checkpoints" / "step_00000006") is None


# ---- a kill during the universal conversion (another world size) -------------------------------------------
_KILL_CONVERSION = """
import os, sys, torch
from pathlib import Path
from t2i_ds.trainer import checkpointing
from t2i_ds.trainer.agree import Agreement
real = torch.save
saved = []
def save(obj, f, *args, **kwargs):  # the converter's writes: SIGKILL once two merged parameters are written
    real(obj, f, *args, **kwargs)
    if str(f).endswith("fp32.pt"):
        saved.append(f)
    if len(saved) == 2:
        os.kill(os.getpid(), 9)
torch.save = save
checkpointing.plan_for(Path(sys.argv[1]), 1, 0, Agreement(0, 1))
"""


def test_a_kill_during_the_universal_conversion_is_redone(base_run, tmp_path):
    """SIGKILL part-way through converting a 2-rank checkpoint for 1 rank: the half-converted files stay in
    universal.tmp, which nothing loads; the next start converts again, into the same checkpoint as a clean one."""
    from tests.trainer_utils import ROOT, env

    ckpt = copy_run(base_run, tmp_path / "run") / "checkpoints" / "step_00000006"
    killed = subprocess.run([sys.executable, "-c", _KILL_CONVERSION, str(ckpt)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(list((ckpt / "universal.tmp").rglob("fp32.pt"))) == 2 and not (ckpt / checkpointing.UNIVERSAL).exists()
    plan = checkpointing.plan_for(ckpt, 1, 0, Agreement(0, 1))  # the next start, at 1 rank
    assert plan.universal and plan.load_dir / plan.tag == ckpt / "universal"  # what the engine loads
    assert (ckpt / "universal" / checkpointing.MARKER).is_file() and not (ckpt / "universal.tmp").exists()
    assert checkpointing.verify(ckpt) is None
    for key in ("fp32", "exp_avg", "exp_avg_sq"):  # every parameter and moment, as the two ranks saved them
        saved = zero_checkpoint_state(ckpt, key)
        assert set(saved) <= {p.name for p in (ckpt / "universal" / "zero").iterdir()}  # (+ rotary buffers)
        for name, tensor in saved.items():
            assert torch.equal(torch.load(ckpt / "universal" / "zero" / name / f"{key}.pt")["param"], tensor), (key, name)


# ---- non-finite steps ------------------------------------------------------------------------------------
def nonfinite_step_scenario(rank: int, run_dir: str, ds_config: str) -> dict:
    """On 2 ranks: two good steps, then one whose loss is NaN on rank 1 only, then a good one."""
    import copy

    from t2i_ds.trainer.trainer import Trainer

    cfg, ds = train.resolve(train.parse_args(["--ds_config", ds_config, *DEBUG[2:], *sets(f"train.run_dir={run_dir}")]))
    tr = Trainer(cfg, ds)
    tr.engine.train()
    assert [tr.train_step(), tr.train_step()] == [False, False]
    zero = hasattr(tr.engine.optimizer, "single_partition_of_fp32_groups")  # stage 0: the client optimizer itself

    def state():
        opt = tr.engine.optimizer
        return {"params": [p.detach().clone() for p in tr.engine.module.parameters()],
                "master": [t.detach().clone() for t in opt.single_partition_of_fp32_groups] if zero else [],
                "adam": copy.deepcopy((opt.optimizer if zero else opt).state_dict()["state"]),
                "lr": tr.engine.get_lr(), "scheduler": tr.engine.lr_scheduler.last_epoch,
                "data": copy.deepcopy(tr.data.state_dict())}

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    before = state()
    module, forward = tr.engine.module, tr.engine.module.forward
    if rank == 1:  # poison this rank's one micro-batch of the next step
        def poisoned(*args, **kwargs):
            module.forward = forward
            out = forward(*args, **kwargs)
            return out._replace(loss_sum=out.loss_sum * float("nan"))
        module.forward = poisoned
    skipped = tr.train_step()
    after = state()
    recovered = not tr.train_step()
    moved = not same(before["params"], [p.detach() for p in tr.engine.module.parameters()])
    tr.close()
    return {"skipped": skipped, "recovered": recovered, "moved_after": moved, "step": tr.step,
            **{f"same_{k}": same(before[k], after[k]) for k in before}}


@pytest.mark.parametrize("ds_config", [DS_ZERO2, DS_ZERO0], ids=["zero2", "zero0"])
def test_a_nonfinite_step_on_two_ranks_changes_no_weight(ranks, tmp_path, ds_config):
    results = ranks.run(nonfinite_step_scenario, run_dir=str(tmp_path / "run"), ds_config=ds_config)
    for r in results:
        print(r)
        assert r["skipped"] and r["recovered"] and r["moved_after"] and r["step"] == 4
        assert r["same_params"] and r["same_master"] and r["same_adam"]  # no update, no optimizer state change
        assert r["same_lr"] and r["same_scheduler"]  # no scheduler advance
        assert not r["same_data"]  # the batch was consumed


def test_stage0_all_reduces_the_gradients_once_per_step(ranks, tmp_path):
    """ds_configs/zero0.json on 2 ranks, A = 2 micro-batches per step: DeepSpeed's comms logger counts one
    all-reduce of the trainable gradients per step and nothing gathered, as t2i_ds.trainer.comms says, and the
    weights stay the same on both ranks."""
    from t2i_ds.config import preset
    from t2i_ds.trainer.comms import counted_volume, expected_volume, parameter_sizes
    from t2i_ds.trainer.parallelize import build_initialised_model

    cfg = json.loads(Path(DS_ZERO0).read_text())
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    (tmp_path / "zero0_comms.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    argv = ["--ds_config", str(tmp_path / "zero0_comms.json"), *DEBUG[2:],
            *sets(f"train.run_dir={run}", "train.steps=3", "train.tokens_per_step=320", "train.save_final=false")]
    results = ranks.run(train_main, argv=argv)
    assert [r["code"] for r in results] == [0, 0], results
    assert json.loads((run / "plan.json").read_text())["grad_accum"] == 2
    debug = preset("debug")
    expected = expected_volume(cfg, parameter_sizes(build_initialised_model(debug, debug.vocab.build())), world=2,
                               accum=2, param_bytes=4)
    assert expected.all_reduce > 0 and expected.all_gather == expected.reduce_scatter == 0
    for m in metrics(run)[1:]:  # step 1 includes the engine's start-up broadcasts
        got = counted_volume(m)
        print(m["step"], got, expected)
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            assert getattr(got, op) == pytest.approx(getattr(expected, op), rel=0.05, abs=64), op


def test_stage0_on_one_rank_sends_nothing_and_learns_the_same(tmp_path):
    """One rank, stage 0: the engine's gradient all-reduce is off (t2i_ds.trainer.parallelize), so the comms logger
    counts no gradient bytes, and the losses are the golden single run's (the same math without the copies)."""
    cfg = json.loads(Path(DS_ZERO0).read_text())
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    (tmp_path / "zero0_comms.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    launch(["--ds_config", str(tmp_path / "zero0_comms.json"), *DEBUG[2:],
            *sets(f"train.run_dir={run}", "train.steps=3", "train.save_final=false")])
    golden = json.loads((ROOT / "tests" / "assets" / "golden_losses.json").read_text())["losses"]["single"]
    got = losses(run)
    for step in (1, 2, 3):
        assert metrics(run)[step - 1].get("comm/all_reduce/bytes_per_step", 0.0) <= 64, step  # scalars only
    assert [got[s] for s in (1, 2)] == pytest.approx(golden[:2], rel=1e-5)  # step 3: a 3-step cosine schedule


def test_a_nonfinite_streak_stops_naming_the_last_good_checkpoint(ranks, tmp_path):
    run = tmp_path / "run"
    results = ranks.run(train_main, argv=[*DEBUG, *sets(f"train.run_dir={run}", "optim.lr=1e6", "train.ckpt_every=1",
                                                        "train.steps=12")])
    assert [r["code"] for r in results] == [2, 2], results
    line = one_error_line(results[0]["stderr"])
    assert "5 steps in a row (steps 2-6) had a non-finite gradient norm: stopped without saving" in line
    assert f"the last good complete checkpoint is {run / 'checkpoints' / 'step_00000001'}" in line
    assert results[1]["stderr"] == ""
    assert [p.name for p in checkpointing.complete_checkpoints(run / "checkpoints")] == ["step_00000001"]
    assert results[0]["stdout"].count("update skipped") == 5
    assert [m["train/skipped_steps"] for m in metrics(run)] == [0, 1, 2, 3, 4]


# ---- disk full during a checkpoint ------------------------------------------------------------------------
def disk_full_scenario(rank: int, argv: list[str]) -> dict:
    """train.main where rank 1's optimizer partition of step 4 hits a full disk."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if rank == 1 and "step_00000004" in str(f) and "optim_states" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    torch.save = save
    try:
        return train_main(rank, argv)
    finally:
        torch.save = real


def test_disk_full_during_a_checkpoint_says_so_and_loses_nothing(ranks, base_run, tmp_path):
    run = tmp_path / "run"
    argv = [*DEBUG, *sets(f"train.run_dir={run}", "train.ckpt_every=2", "train.keep_last=5")]
    results = ranks.run(disk_full_scenario, argv=argv)
    assert [r["code"] for r in results] == [2, 2], results
    line = one_error_line(results[0]["stderr"])
    ckpts = run / "checkpoints"
    assert line == (f"t2i_ds.train: error: checkpoint step_00000004 not saved: rank 1: "
                    f"{ckpts / 'step_00000004' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: [Errno 28] No space left "
                    f"on device; removed the partial directory; the newest complete checkpoint is {ckpts / 'step_00000002'}")
    assert results[1]["stderr"] == "" and not (ckpts / "step_00000004").exists()
    assert checkpointing.verify(ckpts / "step_00000002") is None
    results = ranks.run(train_main, argv=argv)  # space again: the retry in place resumes and finishes
    assert [r["code"] for r in results] == [0, 0], results
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6] and losses(run) == losses(base_run)


# ---- what the user sees through the launcher -----------------------------------------------------------
def test_a_damaged_shard_on_one_of_two_ranks_ends_with_that_ranks_line(tmp_path):
    from t2i_ds.config import preset

    shards = tmp_path / "shards"
    write_random_shards(shards, n_shards=2, per_shard=20, vocab=preset("debug").vocab.build())
    _truncate(shards / "tokens-000001.tar")
    proc = launch([*DEBUG, *sets("train.data_source=shards", f"data.path={shards}", "data.num_workers=0",
                                 "data.min_records_for_broken_check=5", f"train.run_dir={tmp_path / 'run'}")],
                  ranks=2, check=False, timeout=240)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("t2i_ds.train: error: rank ") and "tokens-000001.tar" in last, last
    assert proc.stderr.count("t2i_ds.train: error:") == 1
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "gloo" not in text.lower() and "Connection closed" not in text
