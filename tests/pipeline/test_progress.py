"""pipeline.progress: tqdm on a terminal, whole lines (no carriage returns) anywhere else."""

from __future__ import annotations

import io

from pipeline.progress import PlainProgress, format_duration, progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_prints_a_line_per_interval_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(total=100, desc="build-shards train", unit="img", file=out, interval=30, clock=clock)
    with bar:
        for _ in range(100):
            clock.t += 1.0  # 1 s per image: a report at 30, 60 and 90 s, then the final one
            bar.update(1)
            bar.set_postfix_str("6.6 MB/s")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[0] == "build-shards train: 30/100 img (30%)  1 img/s  elapsed 0:00:30  ETA 0:01:10  6.6 MB/s"
    assert lines[-1] == "build-shards train: 100/100 img (100%)  1 img/s  elapsed 0:01:40  6.6 MB/s"


def test_plain_progress_wraps_an_iterable_and_stays_silent_when_nothing_happened():
    out, clock = io.StringIO(), Clock()
    items = list(PlainProgress(range(3), desc="eval", unit="batch", file=out, clock=clock))
    assert items == [0, 1, 2] and out.getvalue() == "eval: 3/3 batch (100%)  0 batch/s  elapsed 0:00:00\n"
    quiet = io.StringIO()
    PlainProgress(total=5, file=quiet).close()
    assert quiet.getvalue() == ""


def test_progress_picks_by_stream():
    assert isinstance(progress(total=3, file=io.StringIO()), PlainProgress)
    bar = progress(total=3, file=Tty(), desc="x")
    assert not isinstance(bar, PlainProgress) and bar.elapsed >= 0
    bar.close()
    off = progress(range(2), disable=True, file=Tty())
    assert list(off) == [0, 1] and off.elapsed == 0.0


def test_format_duration():
    assert format_duration(0) == "0:00:00" and format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "-" and format_duration(float("nan")) == "-"
