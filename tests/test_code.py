"""The code itself: no unused imports or undefined names, and modules readable in one sitting."""

from __future__ import annotations

import io

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

LONG = 350
"""A product module longer than this says at its top why (issue: every module readable in one sitting)."""


def test_pyflakes_finds_nothing():
    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter

    out, err = io.StringIO(), io.StringIO()
    found = checkRecursive([str(ROOT / d) for d in ("platform", "bench", "testkit", "tests")],
                           Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()


def test_long_modules_say_why():
    unexplained = []
    for path in sorted((ROOT / "platform" / "gradyard").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > LONG and "over 350 lines because" not in text[:3000].lower() \
                and "longer than 350 lines because" not in text[:3000].lower():
            unexplained.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not unexplained


def test_rays_known_noise_is_dropped_and_nothing_else():
    """gradyard.raylogs: the two messages Ray prints on every successful run, and the traceback
    after one, leave the driver's output; other lines, other processes' tracebacks, stay."""
    from gradyard.raylogs import NoiseFilter

    f = NoiseFilter()
    controller = ("1234", True)
    assert f.lines(controller, [
        "[2026-12-01 13:00:00,123 E 1234 1250] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: '882ee2c1fdcb164ee113afbc01000000' has constructor arguments in the object store and "
        "max_restarts > 0. If the arguments in the object store go out of scope...",
        "training on Ray: 2 workers",
        "Failed to stop PlacementGroupCleaner gracefully.",
        "Traceback (most recent call last):",
        '  File "placement_group_callback.py", line 126, in _stop_cleaner',
    ]) == ["training on Ray: 2 workers"]
    # The traceback goes on in the next batch of the same process, then ordinary output resumes.
    assert f.lines(controller, ["    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)",
                                "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
                                "[circles] finished: 39 steps"]) == ["[circles] finished: 39 steps"]
    other = ["Traceback (most recent call last):", '  File "train.py", line 1', "ValueError: a real failure"]
    assert f.lines(("999", True), other) == other


def test_a_real_traceback_after_rays_noise_is_kept():
    """The filter drops the cleaner's own traceback and nothing after it; the PreemptionWatcher line
    takes no traceback with it."""
    from gradyard.raylogs import NoiseFilter

    f = NoiseFilter()
    real = ["Traceback (most recent call last):", '  File "worker.py", line 3, in run', "RuntimeError: real"]
    assert f.lines("c", ["Actor with class name: 'PreemptionWatcher' and ID: 'x' has constructor arguments "
                         "in the object store and max_restarts > 0.", *real]) == real
    assert f.lines("d", ["Failed to stop PlacementGroupCleaner gracefully.", "Traceback (most recent call last):",
                         "  File \"x.py\", line 1", "ray.exceptions.GetTimeoutError: timed out", *real]) == real


PERF_COUNTER_USERS = {
    "steptime.py": "the one step clock: every step, phase and epoch time",
    "analysis/calibrate.py": "microbenchmarks of the device (matmul, bandwidth, dispatch), not training steps",
    "checkpoint/manager.py": "how long a save blocked training",
    "checkpoint/writer.py": "how long the background upload of a checkpoint took",
    "checkpoint/store.py": "how long writing a checkpoint's files took",
}
"""The product's perf_counter users, and what each times (issue #19: four step clocks became one)."""


def test_one_step_clock():
    """Step timing is gradyard.steptime's alone: no other module takes perf_counter marks, except
    those that time something other than a training step (each named above with what it times)."""
    package = ROOT / "platform" / "gradyard"
    users = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "perf_counter" in p.read_text()}
    assert users == set(PERF_COUNTER_USERS)


def test_one_flop_counter():
    """FLOPs are counted by the census's counting mode alone (telemetry's MFU uses it too): no module
    runs torch's FlopCounterMode, and only the census applies flop_counter's formulas."""
    import re

    package = ROOT / "platform" / "gradyard"
    counting = re.compile(r"FlopCounterMode\(|flop_registry\s*(\.get\(|\[)")
    users = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if counting.search(p.read_text())}
    assert users == {"analysis/census.py"}
