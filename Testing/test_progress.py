"""Progress: the ETA from measured step times (a fake clock), plain lines for logs, the terminal bar."""
from __future__ import annotations

import io

from TCURLoRALib.progress import EtaClock, PlainProgress, TerminalProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_an_estimate_until_the_warmup_steps_are_measured_then_leaves_them_out() -> None:
    clock = FakeClock()
    eta = EtaClock(total=10, warmup=3, now=clock)
    durations = [5.0, 3.0, 2.0, 1.0, 1.0, 1.5]  # slow first steps, as in a real training
    reports = []
    for step, seconds in enumerate(durations, 1):
        clock.now += seconds
        reports.append(eta.tick(step))
    # Steps 1-3: the mean of all steps so far, marked as an estimate.
    assert reports[0] == {"eta_s": 45.0, "eta_estimate": True}
    assert reports[2] == {"eta_s": round((5 + 3 + 2) / 3 * 7, 1), "eta_estimate": True}
    # From step 4: the mean of the steps after the warm-up (1.0, then 1.0, then 1.1667).
    assert reports[3] == {"eta_s": 6.0, "eta_estimate": False}
    assert reports[5] == {"eta_s": round((1 + 1 + 1.5) / 3 * 4, 1), "eta_estimate": False}


def test_eta_follows_the_latest_steps_when_the_load_changes() -> None:
    clock = FakeClock()
    eta = EtaClock(total=100, warmup=0, recent=4, now=clock)
    for step in range(1, 11):
        clock.now += 9.0 if step <= 6 else 5.0  # the machine got quieter after step 6
        report = eta.tick(step)
    assert report == {"eta_s": 90 * 5.0, "eta_estimate": False}


def test_time_outside_steps_is_not_step_time_and_pending_work_is_added() -> None:
    clock = FakeClock()
    eta = EtaClock(total=6, warmup=0, now=clock)
    clock.now += 2.0
    eta.tick(1)
    clock.now += 30.0  # a validation
    eta.restart()
    clock.now += 2.0
    assert eta.tick(2, extra_s=30.0) == {"eta_s": 4 * 2.0 + 30.0, "eta_estimate": False}
    clock.now += 6.0  # three steps reported at once (a batch of windows)
    assert eta.tick(5) == {"eta_s": 2.0, "eta_estimate": False}
    assert eta.tick(6, extra_s=30.0)["eta_s"] == 0.0  # nothing left: no pending work either


def test_plain_progress_writes_about_twenty_step_lines_and_every_message() -> None:
    stream = io.StringIO()
    progress = PlainProgress(stream)
    progress("log", message="cases: 2 train (a, b), 1 validates (c): why")
    progress("start", task="train adapter", total=100)
    for step in range(1, 101):
        progress("step", step=step, total=100, loss=0.5, eta_s=float(100 - step), eta_estimate=step <= 3)
        if step == 50:
            progress("metric", name="validation_mean_dice", value=0.71234, step=50)
            progress("metric", name="validation_dice/left", value=0.7, step=50)
    progress("metric", name="loss_scale", value=2, step=None)
    progress("error", kind="internal", message="left to the CLI")
    progress("done", output="a.safetensors", seconds=75.0)
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("train adapter: step ")]
    assert [int(line.split()[3].split("/")[0].rstrip(",")) for line in steps] == [1] + list(range(5, 101, 5))
    assert steps[0] == "train adapter: step 1/100, loss 0.5000, about 1 min 39 s left (estimate)"
    assert steps[1] == "train adapter: step 5/100, loss 0.5000, about 1 min 35 s left"
    assert steps[-1] == "train adapter: step 100/100, loss 0.5000"
    assert lines[0] == "cases: 2 train (a, b), 1 validates (c): why"
    assert lines[1] == "train adapter: started, 100 steps"
    assert "train adapter: validation at step 50: mean Dice 0.7123; left 0.7000" in lines
    assert lines.index("train adapter: validation at step 50: mean Dice 0.7123; left 0.7000") == \
        lines.index("train adapter: step 50/100, loss 0.5000, about 50 s left") + 1
    assert lines[-2:] == ["train adapter: loss_scale 2", "train adapter: done in 1 min 15 s: a.safetensors"]
    assert not any("left to the CLI" in line for line in lines)


def test_terminal_bar_keeps_messages_on_lines_of_their_own() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress("start", task="train", total=4)
    progress("step", step=1, total=4, eta_s=3.0, eta_estimate=True)
    progress("log", message="a message")
    progress("step", step=2, total=4, eta_s=2.0, eta_estimate=False)
    progress("metric", name="validation_mean_dice", value=0.5, step=2)
    progress("metric", name="validation_dice/left", value=0.5, step=2)
    progress("step", step=4, total=4, eta_s=0.0, eta_estimate=False)
    text = stream.getvalue()
    assert "about 3 s left (estimate)" in text
    assert "\na message\n" in text  # the open bar line is ended first
    assert "about 2 s left\x1b[K\nvalidation at step 2: mean Dice 0.5000; left 0.5000\n\r" in text
    assert text.endswith("4/4 \x1b[K\n")
