"""How many tasks are adapted at once (fsl.maml.batching): the CPU's timing probe, counts as set, balanced groups, the
CUDA memory probe's bookkeeping (simulated on a CPU), and running out of memory."""
import pytest
import torch

from fsl.device.rehearsal import FakeGPU, rehearsal
from fsl.maml import batching

CPU = torch.device("cpu")


class Clock:
    """A stand-in for time.perf_counter: each run(group) of `total` tasks advances it by total x cost[group]."""

    def __init__(self, cost: dict[int, float], total: int):
        self.now, self.cost, self.total, self.runs = 0.0, cost, total, []

    def __call__(self) -> float:
        return self.now

    def run(self, group: int) -> None:
        self.runs.append(group)
        if self.cost[group] is None:
            raise torch.cuda.OutOfMemoryError(f"injected: {group} at once")
        self.now += self.total * self.cost[group]


@pytest.fixture
def clock(monkeypatch):
    def make(cost, total):
        fake = Clock(cost, total)
        monkeypatch.setattr(batching.time, "perf_counter", fake)
        return fake
    return make


def test_auto_on_a_cpu_takes_the_fastest_timed_group(clock):
    fake = clock({1: 0.010, 2: 0.007, 4: 0.005, 8: 0.006, 16: 0.009, 32: 0.012}, 32)
    group, why = batching.resolve("auto", 32, CPU, fake.run)
    assert group == 4 and why.startswith("auto: the fastest group on cpu, timed (tasks/s at 1: 100, 2: 143, 4: 200")
    assert fake.runs == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3  # stopped once 8 was over 10% slower than 4


def test_auto_on_a_cpu_takes_one_for_slow_tasks_without_timing_groups(clock):
    fake = clock({1: 4.0, 2: 1.0}, 8)
    assert batching.resolve("auto", 8, CPU, fake.run) == \
        (1, "auto: 1 on cpu (a task takes 4.00 s: compute-bound, grouping gains nothing)")
    assert fake.runs == [1]


def test_deterministic_auto_on_a_cpu_is_one_without_timing(clock):
    """Timing depends on the machine's load; deterministic=true must give equal bits for equal commands."""
    fake = clock({1: 0.010, 2: 0.007, 4: 0.005}, 4)
    group, why = batching.resolve("auto", 4, CPU, fake.run, deterministic=True)
    assert (group, fake.runs) == (1, []) and "deterministic=true" in why
    assert batching.resolve(4, 4, CPU, fake.run, deterministic=True) == (4, "set in the config")


def test_auto_on_a_cpu_stops_at_a_group_that_runs_out_of_memory(clock):
    fake = clock({1: 0.010, 2: 0.006, 4: None}, 8)
    assert batching.resolve("auto", 8, CPU, fake.run)[0] == 2


def test_counts_are_taken_as_set_and_groups_are_balanced():
    assert batching.resolve(4, 8, CPU, lambda group: None)[0] == 4
    assert batching.resolve(16, 8, CPU, lambda group: None)[0] == 8
    assert [batching.balanced_group(8, fits) for fits in (1, 3, 4, 5, 7, 8, 100)] == [1, 3, 4, 4, 4, 8, 8]
    assert batching.candidate_groups(32) == [1, 2, 4, 8, 16, 32]
    assert batching.candidate_groups(12) == [1, 2, 4, 6, 12]  # 8 would run as 6 + 6


def allocate(nbytes: int) -> None:
    """A task's graph of `nbytes` on the (rehearsed) GPU, freed when it returns."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda")


def test_the_memory_probe_keeps_the_runs_peak(monkeypatch):
    """#30: the probe resets torch's peak counter to measure one task; the peak the run had reached before (its
    training steps) must still reach the checkpoint (fsl.train.checkpoint reads run_peak_bytes). On a rehearsed GPU
    (fsl.device.rehearsal: torch.cuda's own memory functions, the driver faked) of 20,000 bytes, 10,000 of them
    held by other processes."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(batching, "_RUN_PEAK", {})
    with rehearsal(gpu=FakeGPU(name="FakeGPU", total_memory=20_000)) as driver:
        driver.used_elsewhere = 10_000
        allocate(7_000)  # training steps so far
        group, why = batching.resolve("auto", 16, gpu, lambda group: allocate(1_000), cap=16)
        assert group == 8 and "1000 fit" not in why  # 0.8 x 10,000 free / 1,000 per episode
        assert batching.run_peak_bytes(gpu) == 7_000  # not the probe's 1,000


def test_a_task_that_does_not_fit_stops_the_memory_probe_with_the_fixes():
    with rehearsal(gpu=FakeGPU(total_memory=20_000)), \
            pytest.raises(batching.OutOfMemory, match="even one task's graph does not fit. Fix: precision=bf16"):
        batching.resolve("auto", 8, torch.device("cuda", 0), lambda group: allocate(30_000))


def test_halved_group_says_so(capsys):
    assert batching.halved(8, CPU, "train.parallel_tasks") == 4 and batching.halved(1, CPU, "x") == 1
    assert "with train.parallel_tasks=8: retrying with 4" in capsys.readouterr().err
