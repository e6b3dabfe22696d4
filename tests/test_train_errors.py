"""Bad input to the train command: one clear line, exit status 2, no traceback.

The config errors are checked through the command's `main` in this process (each is found before DeepSpeed starts:
no process group, nothing launched); the real command, as a process, for the paper recipe without data and for
damaged shards (the loader's worker path).
"""

import pytest

from t2i_ds.train import main as train_main
from tests.trainer_utils import DS_ZERO2, train


def _fails(args, tmp_path, expect: str, capsys=None, process: bool = False):
    preset = [] if "--preset" in args else ["--preset", "debug"]  # the default preset is the paper's 1.5B recipe
    argv = [*args, *preset, "--set", f"train.run_dir={tmp_path / 'run'}"]
    if process:
        proc = train(argv, check=False, timeout=120)
        rc, stderr = proc.returncode, proc.stderr
    else:
        import torch.distributed as dist

        capsys.readouterr()
        rc, stderr = train_main(argv), capsys.readouterr().err
        assert not dist.is_initialized(), "a config error is found before the process group starts"
    assert rc == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("t2i_ds.train: error:") and expect in last, last


@pytest.fixture
def fails(tmp_path, capsys):
    return lambda args, expect: _fails(args, tmp_path, expect, capsys)


def test_missing_ds_config(tmp_path, fails):
    fails(["--ds_config", str(tmp_path / "nope.json")], "nope.json: no such file")


def test_invalid_ds_config(tmp_path, fails):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    fails(["--ds_config", str(bad)], "bad.json: invalid JSON at line 1")


def test_contradicting_ds_config(tmp_path, fails):
    bad = tmp_path / "bs.json"
    bad.write_text('{"train_batch_size": 7, "zero_optimization": {"stage": 2}}')
    fails(["--ds_config", str(bad)], "train_batch_size=7 contradicts")


def test_paper_recipe_without_data_names_the_setting(tmp_path):
    # the launcher's bare command: the paper recipe, and one line saying how to give the token shards
    proc = train(["--ds_config", DS_ZERO2], check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.path is not set: preset 'paper_t2i'" in last and "--set data.path=DIR" in last, last


def test_unknown_preset(fails):
    fails(["--ds_config", DS_ZERO2, "--preset", "nope"], "unknown preset 'nope'")


def test_unknown_field(fails):
    fails(["--ds_config", DS_ZERO2, "--set", "optim.lrr=1"], "unknown field 'lrr'")


def test_batch_cannot_be_met(fails):
    fails(["--ds_config", DS_ZERO2, "--set", "train.tokens_per_step=40", "--set", "train.micro_batch=4"],
          "cannot be met with micro_batch=4")


def test_data_path_without_shards(tmp_path, fails):
    (tmp_path / "empty").mkdir()
    fails(["--ds_config", DS_ZERO2, "--set", "train.data_source=shards", "--set", f"data.path={tmp_path / 'empty'}"],
          "no token shards")


def test_damaged_shards_stop_with_one_line(tmp_path):
    """Every record broken: the loader's threshold error names the shard; no traceback wall."""
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "tokens-000000.tar", "w") as tar:
        for i in range(20):
            for ext, data in (("codes.npy", b"not a numpy file"), ("ids.npy", b"\x00"), ("txt", b"x"), ("json", b"{bad")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _fails(["--ds_config", DS_ZERO2, "--set", "train.data_source=shards", "--set", f"data.path={shards}",
            "--set", "data.num_workers=0", "--set", "data.min_records_for_broken_check=5"], tmp_path, "tokens-000000.tar",
           process=True)
