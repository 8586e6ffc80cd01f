from __future__ import annotations

from embedpipe.embedders.threads import ThreadGovernor


class Recorder:
    """Stands for ``torch.set_num_threads``: records each team size set."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, threads: int) -> None:
        self.sizes.append(threads)


def _contend(governor: ThreadGovernor) -> None:
    """Calls that get 20% of two cores' time, as many as it takes (two) to sleep."""
    for _ in range(2):
        governor.observe(2, wall=0.1, cpu=0.04)


def test_all_cores_while_the_process_gets_them() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    governor.observe(2, wall=0.02, cpu=0.039)
    assert governor.threads == 2
    assert recorder.sizes == []


def test_one_thread_more_than_the_cores_while_other_processes_take_them() -> None:
    # More threads than cores: libgomp's threads then sleep at once instead of spinning.
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    governor.observe(2, wall=0.1, cpu=0.04)  # 20% of two cores' time
    assert governor.threads == 2  # one call alone does not decide
    governor.observe(2, wall=0.1, cpu=0.04)
    assert governor.threads == 3
    assert recorder.sizes == [3]


def test_a_stalled_call_now_and_then_on_free_cores_keeps_them_spinning() -> None:
    # Measured on idle cores: lone calls at 85-97% of two cores, one in ~80 at 45-55%.
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    for share in (0.9, 0.45, 0.92, 0.88, 0.55, 0.91, 0.45, 0.9):
        governor.observe(2, wall=0.02, cpu=0.04 * share)
    assert governor.threads == 2
    assert recorder.sizes == []


def test_a_probe_on_free_cores_brings_all_threads_back() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    _contend(governor)
    # The next probe ran on the cores alone (run() sets them): they are free again.
    governor.observe(2, wall=0.02, cpu=0.038)
    assert governor.threads == 2
    assert recorder.sizes == [3]


def test_a_probe_on_taken_cores_keeps_one_thread() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    _contend(governor)
    governor.observe(2, wall=0.1, cpu=0.14)  # 70%: not enough to go back
    assert governor.threads == 3
    assert recorder.sizes == [3, 3]


def test_short_calls_and_one_core_change_nothing() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    governor.observe(2, wall=0.001, cpu=0.0)
    assert governor.threads == 2
    single = ThreadGovernor(1, recorder)
    single.observe(1, wall=0.1, cpu=0.01)
    assert single.threads == 1
    assert recorder.sizes == []


def test_calls_on_more_threads_than_cores_are_judged_by_the_cores() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    _contend(governor)
    governor.observe(3, wall=0.1, cpu=0.19)  # a sleeping-team call: no probe, no change
    assert governor.threads == 3
    assert recorder.sizes == [3]


def test_run_returns_the_call_and_restores_the_team_after_a_probe() -> None:
    recorder = Recorder()
    governor = ThreadGovernor(2, recorder)
    _contend(governor)  # now sleeping; the first probe is due later
    assert governor.run(lambda: "vectors") == "vectors"
    assert governor.threads == 3
