"""CPU workers own their cores: every thread of a worker's process stays on them, with as many
compute threads; too few cores for an explicit request is refused by name."""

from __future__ import annotations

import os
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from deploy.cluster import WorkerGroup, deploy  # noqa: E402
from engine import EngineConfig  # noqa: E402
from engine.cores import available_cores, bind_cores, thread_cores, thread_env  # noqa: E402

CONFIG = EngineConfig(max_num_batched_tokens=32, num_blocks=64)
needs_two_cores = pytest.mark.skipif(len(available_cores()) < 2, reason="needs 2 cores to give two workers one each")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}},
    )
    yield
    ray.shutdown()


def test_thread_env_sizes_every_pool_and_lets_idle_threads_sleep():
    env = thread_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        thread_env(0)


def test_bind_cores_moves_every_thread_of_the_process():
    """In a child process, so that the test process keeps its cores."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bind_and_report, args=(available_cores()[:1], queue))
    proc.start()
    cores_by_thread, num_threads = queue.get(timeout=120)
    proc.join(30)
    assert len(cores_by_thread) >= 3  # the main thread, one started before binding, one after
    assert all(cores == set(available_cores()[:1]) for cores in cores_by_thread.values())
    assert num_threads == 1


def _bind_and_report(cores, queue) -> None:
    import torch

    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()  # a thread that existed before
    bind_cores(cores)
    threading.Thread(target=stop.wait, daemon=True).start()  # and one started after
    queue.put((thread_cores(), torch.get_num_threads()))
    stop.set()


def test_bind_cores_refuses_cores_the_process_cannot_use():
    with pytest.raises(ValueError, match="are not available"):
        bind_cores([os.cpu_count() + 64])


@needs_two_cores
def test_two_workers_each_own_a_core(local_ray, tiny_llama_dir):
    groups = [WorkerGroup("prefill", 1), WorkerGroup("decode", 1)]
    dep = deploy(tiny_llama_dir, groups, CONFIG, kv_backend="shm", model_name="tiny", pin_cores=True)
    try:
        prefill, decode = dep.infos
        assert len(prefill.cores) == len(decode.cores) == 1 and set(prefill.cores).isdisjoint(decode.cores)
        assert prefill.num_threads == decode.num_threads == 1
        assert dep.cores.pinned and not dep.cores.router  # two cores, two workers: none left
        labels = ["prefill 0", "decode 0"]
        assert f"prefill 0: cores [{prefill.cores[0]}]" in dep.cores.describe(labels)
        assert "router: no core left for it" in dep.cores.describe(labels)
    finally:
        dep.shutdown()


def test_more_cores_than_the_machine_has_is_refused(local_ray, tiny_llama_dir):
    groups = [WorkerGroup("prefill", 1, num_cpus=len(available_cores())), WorkerGroup("decode", 1)]
    with pytest.raises(ValueError, match=r"the CPU workers need \d+ cores on node .*, which has \d+"):
        deploy(tiny_llama_dir, groups, CONFIG, kv_backend="shm", model_name="tiny", pin_cores=True)
    deadline = time.monotonic() + 60  # placement groups are removed asynchronously
    while ray.available_resources().get("CPU") != ray.cluster_resources().get("CPU"):  # nothing kept
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def test_without_enough_cores_workers_share_them_with_fewer_threads(local_ray, tiny_llama_dir):
    num = len(available_cores()) + 1
    groups = [WorkerGroup("prefill", 1), WorkerGroup("decode", num - 1)]
    dep = deploy(tiny_llama_dir, groups, CONFIG, kv_backend="shm", model_name="tiny")
    try:
        assert not dep.cores.pinned
        assert all(info.num_threads == 1 for info in dep.infos)  # never more threads than cores
    finally:
        dep.shutdown()
