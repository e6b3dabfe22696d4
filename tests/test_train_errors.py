"""Bad input to the train command: one clear line, exit status 2, no traceback."""


from tests.trainer_utils import DS_ZERO2, train


def _fails(args, tmp_path, expect: str):
    preset = [] if "--preset" in args else ["--preset", "debug"]  # the default preset is the paper's 1.5B recipe
    proc = train([*args, *preset, "--set", f"train.run_dir={tmp_path / 'run'}"], check=False, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = err[-1]
    assert last.startswith("t2i_ds.train: error:") and expect in last, last


def test_missing_ds_config(tmp_path):
    _fails(["--ds_config", str(tmp_path / "nope.json")], tmp_path, "nope.json: no such file")


def test_invalid_ds_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    _fails(["--ds_config", str(bad)], tmp_path, "bad.json: invalid JSON at line 1")


def test_contradicting_ds_config(tmp_path):
    bad = tmp_path / "bs.json"
    bad.write_text('{"train_batch_size": 7, "zero_optimization": {"stage": 2}}')
    _fails(["--ds_config", str(bad)], tmp_path, "train_batch_size=7 contradicts")


def test_paper_recipe_without_data_names_the_setting(tmp_path):
    # the launcher's bare command: the paper recipe, and one line saying how to give the token shards
    proc = train(["--ds_config", DS_ZERO2], check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.path is not set: preset 'paper_t2i'" in last and "--set data.path=DIR" in last, last


def test_unknown_preset(tmp_path):
    _fails(["--ds_config", DS_ZERO2, "--preset", "nope"], tmp_path, "unknown preset 'nope'")


def test_unknown_field(tmp_path):
    _fails(["--ds_config", DS_ZERO2, "--set", "optim.lrr=1"], tmp_path, "unknown field 'lrr'")


def test_batch_cannot_be_met(tmp_path):
    _fails(["--ds_config", DS_ZERO2, "--set", "train.tokens_per_step=40", "--set", "train.micro_batch=4"], tmp_path,
           "cannot be met with micro_batch=4")


def test_data_path_without_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(["--ds_config", DS_ZERO2, "--set", "train.data_source=shards", "--set", f"data.path={tmp_path / 'empty'}"],
           tmp_path, "no token shards")


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
            "--set", "data.num_workers=0", "--set", "data.min_records_for_broken_check=5"], tmp_path, "tokens-000000.tar")
