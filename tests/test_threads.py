"""A Model made without a thread count runs on the cores that other processes leave free.

The competing processes are real ones (bench.busy.busy_cpus spins them), measured through the
real /proc/stat; the parsing and the arithmetic are also checked on their own.
"""

import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgekit.device import Model
from edgekit.device.bench.busy import busy_cpus
from edgekit.device.sysinfo import usable_cpus
from edgekit.device.threads import RECHECK_S, STICK, cpu_quota, cpu_times, free_threads, others_busy

PROMPT = "The robot arm moves to the left and then"

STAT = """cpu  900 0 450 9000 30 0 20 5 0 0
cpu0 100 0 50 1000 10 0 5 0 0 0
cpu1 200 0 100 2000 10 0 5 5 0 0
cpu2 300 0 150 3000 5 0 5 0 0 0
cpu3 300 0 150 3000 5 0 5 0 0 0
intr 12345
"""


@given(cores=st.integers(1, 64), others=st.floats(0, 128, allow_nan=False), most=st.integers(1, 64),
       more=st.floats(0, 64, allow_nan=False))
def test_free_threads_are_the_cores_left_between_one_and_the_most(cores, others, most, more):
    t = free_threads(cores, others, most)
    assert 1 <= t <= most
    assert free_threads(cores, others + more, most) <= t  # busier never means more threads
    if others < 0.5:
        assert t == min(cores, most)  # a quiet machine: every core, as onnxruntime's default
    if others > cores - 0.5:
        assert t == 1


@given(cores=st.integers(1, 64), others=st.floats(0, 128, allow_nan=False), most=st.integers(1, 64),
       current=st.integers(1, 64))
def test_a_thread_count_changes_only_once_the_cores_left_are_clearly_another(cores, others, most, current):
    t = free_threads(cores, others, most, current)
    assert 1 <= t <= most
    left = cores - others
    if current <= most and abs(left - current) < STICK:
        assert t == current  # no session rebuilt for a load that hovers between two counts
    else:
        assert t == free_threads(cores, others, most)


def test_cpu_times_counts_the_busy_time_of_this_process_cpus_only():
    import os

    tick = os.sysconf("SC_CLK_TCK")
    t = cpu_times(frozenset({1, 2}), STAT)
    # user + nice + system + irq + softirq + steal of cpu1 and cpu2; idle and iowait are not busy
    assert t is not None and t.busy == pytest.approx((200 + 100 + 5 + 5 + 300 + 150 + 5) / tick)


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker run --cpus 1.5
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),  # no cgroup files: not Linux, or not mounted
])
def test_a_containers_cpu_quota_is_read_from_cgroup_v1_or_v2(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cores


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_others_busy_sees_competing_processes_and_not_this_one():
    cpus = usable_cpus()
    before = cpu_times(cpus)
    spin(0.5)  # this process keeps one core busy: its own time, not others'
    after = cpu_times(cpus)
    assert before is not None and after is not None
    own = after.own - before.own
    assert own > 0.1
    assert own <= after.busy - before.busy + 0.05  # in the same unit: its time is part of the cores' busy time
    assert 0 <= others_busy(before, after) <= len(cpus) + 0.2

    with busy_cpus(len(cpus)):
        before = cpu_times(cpus)
        time.sleep(0.5)
        after = cpu_times(cpus)
    assert before is not None and after is not None
    assert others_busy(before, after) > 0.6 * len(cpus)


def generated_ids(model: Model) -> list[int]:
    return model.generate(PROMPT, max_new_tokens=12, temperature=0).token_ids


def run_for(model: Model, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        generated_ids(model)


def test_a_model_without_a_thread_count_follows_the_free_cores_and_keeps_its_cache(tiny_bundle):
    want = generated_ids(Model(tiny_bundle, threads=1))
    model = Model(tiny_bundle)  # on whatever this machine has free now
    fixed = Model(tiny_bundle, threads=2)
    ids = model.encode(PROMPT)
    first, _ = model.prefill(ids)
    with busy_cpus(len(usable_cpus())):  # every core busy with another process
        assert Model(tiny_bundle).threads == 1  # measured while it loads
        model.prefill(ids)
        run_for(model, RECHECK_S + 0.3)  # measured while it runs
        logits, reused = model.prefill(ids + ids[1:4])  # the next request rebuilds the session on one thread
        assert model.threads == 1
        assert reused == len(ids)  # the tokens cached before the rebuild are still there
        fresh, _ = Model(tiny_bundle, threads=1).prefill(ids + ids[1:4])
        np.testing.assert_allclose(logits, fresh, atol=1e-4)
        assert generated_ids(model) == want
        fixed.prefill(ids)
        assert fixed.threads == 2  # a thread count given is kept
    np.testing.assert_allclose(first, Model(tiny_bundle, threads=2).prefill(ids)[0], atol=1e-4)


def test_what_others_run_while_a_model_waits_for_work_does_not_count(tiny_bundle):
    model = Model(tiny_bundle)
    before = model.threads
    with busy_cpus(len(usable_cpus())):
        time.sleep(RECHECK_S + 0.3)  # the model waits for a request while the cores are busy
    model.prefill(model.encode(PROMPT))
    assert model.threads == before  # that wait is not what it measures: the count stays
