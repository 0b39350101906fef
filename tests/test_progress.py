"""batchnorm._progress: one behaviour for every long loop (training, recalibration)."""

import io

from batchnorm._progress import LINES, Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(stream, total, steps=None, **options):
    with Progress("job", total, "steps", stream=stream, **options) as bar:
        for done in range(1, (steps or total) + 1):
            bar.update(done, "acc 0.5" if done == 3 else None)
    return stream.getvalue()


def test_not_a_terminal_plain_lines_at_each_tenth():
    text = _run(io.StringIO(), 1000)
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert len(lines) == LINES
    assert [line.split(",")[0] for line in lines] == [
        f"job: {100 * i}/1000 steps ({10 * i} %)" for i in range(1, 11)
    ]
    assert lines[-1].endswith("acc 0.5")  # the latest info rides along


def test_short_loops_print_at_most_one_line_per_step():
    assert len(_run(io.StringIO(), 3).splitlines()) == 3


def test_a_terminal_gets_one_live_line_erased_at_the_end():
    text = _run(_Terminal(), 50)
    assert "\n" not in text
    assert text.startswith("\rjob") and "50/50 steps" in text and text.endswith("\r\x1b[K")


def test_off_on_request():
    assert _run(io.StringIO(), 100, enabled=False) == ""
    assert _run(_Terminal(), 100, enabled=False) == ""


def test_time_left_is_shown_while_running_and_not_at_the_end():
    lines = _run(io.StringIO(), 100).splitlines()
    assert all(", ETA " in line for line in lines[:-1])
    assert ", ETA " not in lines[-1]  # done: nothing left
    live = _run(_Terminal(), 50)
    assert "ETA" in live
