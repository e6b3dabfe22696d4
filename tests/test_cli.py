"""Every command answers bad input with one line naming the problem and exit status 2."""

import subprocess
import sys

import pytest

from tests.trainer_utils import ROOT, env

CASES = [
    (["t2i_ds.generate", "--checkpoint", "{tmp}/norun", "--captions", "x", "--out", "{tmp}/g.png"], "norun/config.json does not exist"),
    (["t2i_ds.prepare", "--input", "{tmp}/noinput", "--out", "{tmp}/p", "--image-tokenizer", "nokind:{tmp}"], "nokind"),
    (["t2i_ds.paper.align", "--shards", "{tmp}/noshards", "--checkpoint", "{tmp}/x.pt", "--out", "{tmp}/a"], "noshards"),
    (["t2i_ds.paper.figures", "--runs", "a={tmp}/norun", "--out", "{tmp}/f"], "no TensorBoard event files under"),
    (["t2i_ds.export", "--run-dir", "{tmp}/norun", "--out", "{tmp}/x.pt"], "not a t2i_ds run directory"),
]


@pytest.mark.parametrize("argv,expect", CASES, ids=[c[0][0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, argv, expect):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{argv[0]}: error:") and expect in last, last
