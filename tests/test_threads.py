"""The engine core's CPU thread count: precedence of the user's settings, then the choice."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import write_files
from tova_engine.execution import threads
from tova_engine.execution.threads import choose_cpu_threads, configure_cpu_threads


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", None)
    for name in ("TOVA_CPU_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


def test_tova_cpu_threads_wins_over_everything():
    env = {"TOVA_CPU_THREADS": "3", "OMP_NUM_THREADS": "8"}
    assert choose_cpu_threads(env, current=8, torch_default=16, cores=16).threads == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_tova_cpu_threads_is_refused(value):
    with pytest.raises(ValueError, match="TOVA_CPU_THREADS must be an integer >= 1"):
        choose_cpu_threads({"TOVA_CPU_THREADS": value}, current=2, torch_default=2, cores=2)


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_an_explicit_omp_or_mkl_setting_is_kept(name):
    choice = choose_cpu_threads({name: "4"}, current=4, torch_default=16, cores=16)
    assert choice.threads == 4 and name in choice.reason


def test_an_earlier_torch_set_num_threads_is_kept():
    choice = choose_cpu_threads({}, current=3, torch_default=16, cores=16)
    assert choice.threads == 3 and "set_num_threads" in choice.reason


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_otherwise_one_core_is_left_free(cores, expected):
    choice = choose_cpu_threads({}, current=cores, torch_default=cores, cores=cores)
    assert choice.threads == expected


def test_an_empty_variable_counts_as_unset():
    env = {"TOVA_CPU_THREADS": " ", "OMP_NUM_THREADS": ""}
    assert choose_cpu_threads(env, current=4, torch_default=4, cores=4).threads == 3


def test_configure_sets_torch_once_and_logs_once(restore_threads, monkeypatch, caplog):
    monkeypatch.setattr(threads, "torch_default_threads", torch.get_num_threads)
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    with caplog.at_level("INFO", logger="tova_engine"):
        assert configure_cpu_threads(torch.device("cpu")) == 2
        # A second engine in the process keeps the choice instead of taking it for the user's.
        assert configure_cpu_threads(torch.device("cpu")) == 2
    assert torch.get_num_threads() == 2
    assert caplog.text.count("CPU threads: 2") == 1


def test_configure_honours_the_environment(restore_threads, monkeypatch):
    monkeypatch.setenv("TOVA_CPU_THREADS", "1")
    assert configure_cpu_threads(torch.device("cpu")) == 1
    assert torch.get_num_threads() == 1


def test_cuda_keeps_torchs_count_unless_told(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not applied here: torch read it at import
    before = torch.get_num_threads()
    # A device object needs no GPU; nothing is run on it.
    assert configure_cpu_threads(torch.device("cuda")) == before
    assert torch.get_num_threads() == before
    monkeypatch.setenv("TOVA_CPU_THREADS", "1")
    assert configure_cpu_threads(torch.device("cuda")) == 1


CPUINFO_SMT = "".join(
    f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4)
)


def test_physical_cores_count_smt_siblings_once(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO_SMT)
    assert threads._physical_cores(path) == 2
    path.write_text("processor\t: 0\nBogoMIPS\t: 50\n")  # no core ids (some ARM kernels)
    assert threads._physical_cores(path) is None


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "max 100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, quota):
    write_files(tmp_path / "sys/fs/cgroup", files)
    assert threads._cgroup_cpu_quota(tmp_path) == quota


def test_usable_cores_obey_the_cpu_quota(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: None)
    unlimited = threads.usable_cores()
    assert 1 <= unlimited <= (os.cpu_count() or 1)
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 0.5)
    assert threads.usable_cores() == 1
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 1.5)  # --cpus=1.5: 2 threads
    assert threads.usable_cores() == min(2, unlimited)
