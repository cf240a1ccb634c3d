"""The CPU budget (medtl/threads.py): usable CPUs from affinity, cgroup quotas and torchrun's
local world size; who chooses the thread count; the OpenMP wait policy set before torch loads."""

import os
import subprocess
import sys

import pytest

from medtl import threads
from medtl.threads import cgroup_cpu_limit, plan, set_wait_policy, usable_cpus


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def test_cgroup_v2_quota_takes_the_tightest_level(tmp_path):
    _write(tmp_path / "self", "0::/jobs/job7\n")
    _write(tmp_path / "fs" / "jobs" / "job7" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "fs" / "jobs" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "self") == 1.5
    _write(tmp_path / "fs" / "jobs" / "cpu.max", "50000 100000\n")  # a parent caps it harder
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "self") == 0.5
    _write(tmp_path / "fs" / "jobs" / "cpu.max", "max 100000\n")
    _write(tmp_path / "fs" / "jobs" / "job7" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "self") is None


def test_cgroup_v1_quota_and_a_container_mounted_at_its_own_cgroup(tmp_path):
    _write(tmp_path / "self", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    # inside a container the host's path /docker/abc does not exist: the mount is the cgroup itself
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "self") == 2.0
    _write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "self") is None
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "no-such-file") is None


def test_usable_cpus_from_affinity_quota_and_torchrun(tmp_path, eight_cpus):
    fs, me = tmp_path / "fs", tmp_path / "self"
    _write(me, "0::/job\n")
    assert usable_cpus({}, root=fs, self_cgroup=me) == (8, "affinity")
    _write(fs / "job" / "cpu.max", "250000 100000\n")  # 2.5 CPUs: rounded down
    assert usable_cpus({}, root=fs, self_cgroup=me) == (2, "cgroup quota 2.5 CPUs")
    _write(fs / "job" / "cpu.max", "20000 100000\n")  # a fifth of a CPU: still one thread
    assert usable_cpus({}, root=fs, self_cgroup=me)[0] == 1
    _write(fs / "job" / "cpu.max", "max 100000\n")
    assert usable_cpus({"LOCAL_WORLD_SIZE": "4"}, root=fs, self_cgroup=me) == (2, "affinity, shared by 4 torchrun processes")
    assert usable_cpus({"LOCAL_WORLD_SIZE": "16"}, root=fs, self_cgroup=me)[0] == 1
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=x"):
        usable_cpus({"LOCAL_WORLD_SIZE": "x"}, root=fs, self_cgroup=me)


def test_who_chooses_the_thread_count(tmp_path, eight_cpus):
    where = dict(root=tmp_path, self_cgroup=tmp_path / "none")

    def chosen(threads=None, **env):
        budget = plan(threads, env, **where)
        return budget.intra_op, budget.source

    assert chosen() == (8, "usable CPUs")
    assert chosen(OMP_NUM_THREADS="4,2") == (4, "OMP_NUM_THREADS")  # the user's OpenMP setting is kept
    assert chosen(OMP_NUM_THREADS="4", MEDTL_NUM_THREADS="3") == (3, "MEDTL_NUM_THREADS")
    assert chosen(2, OMP_NUM_THREADS="4", MEDTL_NUM_THREADS="3") == (2, "--threads")
    assert plan(None, {}, **where).inter_op == 1
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match=f"MEDTL_NUM_THREADS={bad}: expected a positive whole number"):
            plan(None, {"MEDTL_NUM_THREADS": bad}, **where)
    with pytest.raises(ValueError, match="--threads=0"):
        plan(0, {}, **where)


def test_wait_policy_only_before_torch_and_never_over_the_users(monkeypatch):
    monkeypatch.setattr(threads, "_busy_at_start", None)  # restored after the test, like _wait
    monkeypatch.setattr(threads, "_wait", {})
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_wait_policy(env) == "OMP_WAIT_POLICY=ACTIVE (user)" and env == {"OMP_WAIT_POLICY": "ACTIVE"}

    monkeypatch.setattr(threads, "_wait", {})
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", object()))
    env = {}
    assert set_wait_policy(env).startswith("OpenMP default") and env == {}  # too late: the runtime has read it

    monkeypatch.setattr(threads, "_wait", {})
    monkeypatch.delitem(sys.modules, "torch")
    env = {}
    setting = set_wait_policy(env, busy=1.0)  # a neighbour holds a CPU: spin briefly, then sleep
    assert env == threads.WAIT_POLICY and setting.endswith("(medtl: 1.0 CPUs busy at start)") and "GOMP_SPINCOUNT=1000" in setting

    monkeypatch.setattr(threads, "_wait", {})
    env = {}
    assert set_wait_policy(env, busy=0.2).endswith("(medtl: CPUs idle at start (0.2 busy))") and env == {}  # the default


def test_the_default_thread_count_leaves_out_cpus_busy_at_start(tmp_path):
    where = {"root": tmp_path, "self_cgroup": tmp_path / "none"}
    env = {}
    assert plan(None, env, busy=0.3, **where).intra_op == len(os.sched_getaffinity(0))
    busy = plan(None, env, busy=1.0, **where)
    assert busy.intra_op == max(1, len(os.sched_getaffinity(0)) - 1) and busy.source.startswith("usable CPUs idle at start")
    assert plan(None, env, busy=64.0, **where).intra_op == 1
    assert plan(2, env, busy=64.0, **where).intra_op == 2 and plan(None, {"MEDTL_NUM_THREADS": "2"}, busy=64.0, **where).intra_op == 2


def test_busy_cpus_counts_only_this_process_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    lines = ["cpu  999 0 0 999 0 0 0 0 0 0", "cpu0 {} 0 0 {} 0 0 0 0 0 0", "cpu1 {} 0 0 {} 0 0 0 0 0 0", "cpu2 {} 0 0 {} 0 0 0 0 0 0",
             "intr 12345"]
    def write(times):
        stat.write_text("\n".join([lines[0], *(line.format(*t) for line, t in zip(lines[1:4], times)), lines[4]]) + "\n")
    write([(100, 900), (100, 900), (100, 900)])
    # over the interval cpu0 was busy, cpu1 idle, cpu2 (not this process's) busy
    monkeypatch.setattr("time.sleep", lambda seconds: write([(200, 900), (100, 1000), (200, 900)]))
    assert threads.busy_cpus(stat=stat, cpus={0, 1}) == pytest.approx(1.0)
    assert threads.busy_cpus(stat=tmp_path / "missing", cpus={0}) is None


def _cli(args, **env):
    """Run ``medtl ARGS`` in a fresh process; the thread counts torch ended with, and stderr."""
    code = ("import sys; from medtl.cli import main; main(sys.argv[1:]); import torch; "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    clean = {k: v for k, v in os.environ.items() if k not in (*threads.WAIT_VARIABLES, "OMP_NUM_THREADS", threads.ENV_THREADS)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env={**clean, **env})
    return done.stdout.split()[-2:], done.stderr


@pytest.mark.slow
def test_cli_applies_the_budget_before_torch_loads(tmp_path):
    """--threads wins over MEDTL_NUM_THREADS; medtl's wait policy is set before torch imports, a
    user's is kept; the budget is logged (the command itself fails here: no such bundle)."""
    counts, err = _cli(["evaluate", str(tmp_path / "none"), str(tmp_path / "none.csv"), "--out", str(tmp_path / "e"),
                        "--threads", "1"], MEDTL_NUM_THREADS="2")
    assert counts == ["1", "1"]
    assert "1 intra-op thread(s) (--threads), 1 inter-op" in err and "(medtl: " in err  # short spin or default, by the load
    assert ("GOMP_SPINCOUNT=1000" in err) != ("OpenMP=default" in err)
    counts, err = _cli(["evaluate", str(tmp_path / "none"), str(tmp_path / "none.csv"), "--out", str(tmp_path / "e")],
                       MEDTL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    assert counts == ["1", "1"] and "(MEDTL_NUM_THREADS)" in err and "OpenMP wait: OMP_WAIT_POLICY=PASSIVE (user)" in err

