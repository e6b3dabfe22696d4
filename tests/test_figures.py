"""Figures from TensorBoard events: synthetic runs in, PNGs of the expected size out."""

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from t2i_ds.paper.curves import ema, load_curves, x_values
from t2i_ds.paper.figures import main

TOKENS_PER_STEP = 1_000_000
T2I_TAGS = ("loss/total", "loss/text", "loss/image", "ppl/total", "ppl/text", "ppl/image")


def write_t2i_run(path, offset, steps=30):
    with SummaryWriter(str(path)) as w:
        for step in range(1, steps + 1):
            loss = 2.0 + offset + 3.0 / step
            for tag in T2I_TAGS:
                w.add_scalar(tag, np.exp(loss) if tag.startswith("ppl") else loss, step)
            w.add_scalar("tokens/seen", step * TOKENS_PER_STEP, step)


def write_align_run(path, steps=20):
    with SummaryWriter(str(path)) as w:
        for step in range(1, steps + 1):
            w.add_scalar("align/loss", 6.0 / step, step)
            w.add_scalar("align/temperature", 0.07 - 0.001 * step, step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_t2i_run(root / "pretrained" / "tb", 0.0)  # events in a sub-folder: found recursively
    write_t2i_run(root / "random", 0.1)
    write_align_run(root / "align")
    return root


def _check_png(path, size):
    img = Image.open(path).convert("L")
    assert img.size == size
    pixels = np.asarray(img)
    assert pixels.min() < 128 and (pixels < 250).mean() > 0.01  # lines and text were drawn on white


def test_all_figures(runs, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["--runs", f"pretrained={runs / 'pretrained'}", f"random={runs / 'random'}", f"align={runs / 'align'}", "--out", str(out)]
    paths = main(argv)
    assert [p.name for p in paths] == ["fig3.png", "fig4.png", "fig6.png", "fig7.png"]
    for name, size in {"fig3": (640, 400), "fig4": (1280, 400), "fig6": (640, 400), "fig7": (640, 800)}.items():
        _check_png(out / f"{name}.png", size)
    printed = capsys.readouterr().out
    assert "fig3: run 'align' lacks ppl/total" in printed and "fig7: run 'pretrained' lacks" in printed


def test_missing_tags_skip_the_figure(runs, tmp_path, capsys):
    paths = main(["--runs", f"align={runs / 'align'}", "--out", str(tmp_path), "--figures", "fig3", "fig7", "--ema", "0"])
    assert [p.name for p in paths] == ["fig7.png"]
    assert "skipping fig3: no run has ppl/total" in capsys.readouterr().out
    assert not (tmp_path / "fig3.png").exists()


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs given"):
        main(["--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        main(["--runs", f"empty={tmp_path}", "--out", str(tmp_path)])


def test_ema_matches_hand_computation():
    # alpha 0.5: m = 0.5, 1.75, 3.375; debias by 1 - 0.5^(t+1) = 0.5, 0.75, 0.875
    np.testing.assert_allclose(ema(np.array([1.0, 3.0, 5.0]), 0.5), [1.0, 1.75 / 0.75, 3.375 / 0.875])
    np.testing.assert_allclose(ema(np.full(50, 7.0), 0.95), np.full(50, 7.0))  # a constant stays constant
    np.testing.assert_array_equal(ema(np.array([4.0, 2.0]), 0.0), [4.0, 2.0])


def test_tokens_axis_and_resumed_steps(tmp_path):
    with SummaryWriter(str(tmp_path / "a")) as w:
        for step in (10, 20):
            w.add_scalar("tokens/seen", step * 100, step)
            w.add_scalar("loss/image", 1.0, step)
    with SummaryWriter(str(tmp_path / "b")) as w:  # a resumed run logs step 20 again, later
        w.add_scalar("loss/image", 0.5, 20)
        w.add_scalar("loss/image", 0.4, 15)
    run = load_curves(tmp_path)
    np.testing.assert_array_equal(run["loss/image"].steps, [10, 15, 20])
    np.testing.assert_allclose(run["loss/image"].values, [1.0, 0.4, 0.5], rtol=1e-6)  # fp32 in events
    np.testing.assert_array_equal(x_values(run, run["loss/image"], "tokens"), [1000, 1500, 2000])
    np.testing.assert_array_equal(x_values(run, run["loss/image"], "step"), [10, 15, 20])
