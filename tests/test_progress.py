"""Progress: a tqdm bar on a terminal, plain lines every few percent in a log, nothing on other ranks."""

import io

from t2i_ds.progress import Progress, track


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_mode_writes_a_line_every_few_percent():
    out = io.StringIO()  # not a terminal: a log file
    with Progress(200, "prepare", "images", rank=0, stream=out, every_pct=10) as bar:
        for _ in range(200):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then the final line at close
    assert lines[0].startswith("prepare: 20/200 images (10%) | ") and "images/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("prepare: 200/200 images (100%)") and "ETA" not in lines[-1]
    assert "\r" not in out.getvalue()


def test_log_mode_big_steps_and_postfix():
    out = io.StringIO()
    bar = Progress(10, "align", "steps", rank=0, stream=out, every_pct=5)
    bar.set_postfix("loss 1.25")
    bar.update(7)  # one jump over many 5% marks: one line
    bar.update(3)
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["align: 7/10 steps (70%)", "align: 10/10 steps (100%)"]
    assert lines[0].endswith(" | loss 1.25")


def test_unknown_total_logs_by_time(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 1.0, 30.0, 61.0, 62.0, 130.0, 131.0])
    monkeypatch.setattr("t2i_ds.progress.time.perf_counter", lambda: next(clock))
    bar = Progress(None, "fid", "images", rank=0, stream=out, every_s=60)
    for _ in range(5):
        bar.update(8)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["fid: 24 images", "fid: 40 images"]  # at t=61 and t=130


def test_terminal_mode_is_a_tqdm_bar_with_rate_and_eta():
    out = FakeTTY()
    assert list(track(range(50), desc="generate", unit="images", rank=0, stream=out)) == list(range(50))
    text = out.getvalue()
    assert "\r" in text and "generate: 100%" in text and "50/50" in text and "images/s" in text
    assert "prepare" not in text and "<00:00" in text  # tqdm's [elapsed<remaining] field


def test_other_ranks_are_silent():
    for stream in (io.StringIO(), FakeTTY()):
        with Progress(4, "prepare", rank=1, stream=stream) as bar:
            bar.update(4)
        assert stream.getvalue() == ""


def test_rank_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    out = io.StringIO()
    with Progress(2, "prepare", stream=out) as bar:
        bar.update(2)
    assert out.getvalue() == ""
