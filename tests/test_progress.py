"""medcap._progress: a bar on a terminal, plain timed lines anywhere else."""

from __future__ import annotations

import io

from medcap._progress import progress


class _FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_one_plain_line_per_interval_and_a_last_one():
    out, clock = io.StringIO(), _FakeClock()
    bar = progress(100, "train", "steps", every_s=30, file=out, clock=clock)
    for _ in range(10):  # 10 steps at 2 s each: 20 s, under the interval
        clock.t += 2
        bar.update(1, loss=2.5)
    assert out.getvalue() == ""
    for _ in range(10):  # 20 more steps: the 30 s mark is crossed once (at step 15)
        clock.t += 2
        bar.update(1, loss=1.25)
    bar.close()
    bar.close()  # closing twice writes nothing more
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    # step 15 at 30 s: 0.5 steps/s, 85 steps left -> 170 s = 2:50
    assert lines[0] == "train: 15/100 steps (15%) | 0.5 steps/s | elapsed 0:30 | ETA 2:50 | loss=1.25"
    assert lines[1] == "train: 20/100 steps (20%) | 0.5 steps/s | elapsed 0:40 | loss=1.25"


def test_unknown_total_and_hours():
    out, clock = io.StringIO(), _FakeClock()
    with progress(None, "", "images", every_s=60, file=out, clock=clock) as bar:
        clock.t += 3600 + 62  # 7 / 3662 s = 0.00191 images/s
        bar.update(7)
    assert out.getvalue().splitlines() == [
        "7 images | 0.00191 images/s | elapsed 1:01:02",
        "7 images | 0.00191 images/s | elapsed 1:01:02",
    ]


def test_terminal_gets_a_redrawn_bar_with_the_postfix():
    out = _Terminal()
    with progress(4, "eval", "rows", file=out) as bar:
        for _ in range(4):
            bar.update(1, loss=0.5)
    text = out.getvalue()
    assert "\r" in text
    assert "4/4" in text and "eval" in text and "loss=0.5" in text


def test_disabled_writes_nothing():
    out = _Terminal()
    with progress(3, "x", enabled=False, file=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
