"""medcap._io._progress: a bar on a terminal, plain timed lines anywhere else, library noise held back."""

from __future__ import annotations

import io

from medcap._io import progress


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


def test_child_stderr_held_back_unless_the_block_fails(capfd):
    import subprocess

    import pytest

    from medcap._io import quiet_stderr_fd

    with quiet_stderr_fd():
        subprocess.run(["sh", "-c", "echo PTBTokenizer tokenized 3359 tokens >&2"], check=True)
    assert "PTBTokenizer" not in capfd.readouterr().err
    with pytest.raises(subprocess.CalledProcessError):
        with quiet_stderr_fd():
            subprocess.run(["sh", "-c", "echo Error: no java >&2; exit 3"], check=True)
    assert "Error: no java" in capfd.readouterr().err


def test_library_noise_quieted(caplog):
    import logging

    from medcap._io import quiet_library_noise

    tt = logging.getLogger("torchtune.utils._logging")
    own = logging.StreamHandler(io.StringIO())  # what torchtune's get_logger adds before logging is set up
    tt.addHandler(own)
    rope = logging.getLogger("transformers.modeling_rope_utils")
    saved_filters = list(rope.filters)
    try:
        quiet_library_noise()
        assert own not in tt.handlers
        caplog.set_level("WARNING")
        rope.warning("`rope_parameters`'s original_max_position_embeddings field must be less than "
                     "max_position_embeddings, got 8192 and max_position_embeddings=256")
        rope.warning("some other rope problem")
        assert [r.getMessage() for r in caplog.records] == ["some other rope problem"]
    finally:
        tt.removeHandler(own)
        rope.filters[:] = saved_filters
