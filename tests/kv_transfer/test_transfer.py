"""Transfer handles, the deadline clock and the backend registry, without any process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
import torch

from kv_transfer import Transfer, TransferState, backend_names, load_backend


def make(on_release=None, cancels=None):
    def cancel(transfer_id, reason):
        if cancels is not None:
            cancels.append((transfer_id, reason))

    return Transfer("t", (3, 4), on_release, cancel)


def test_states_move_forward_only():
    transfer = make()
    assert transfer.state is TransferState.PENDING
    transfer._moving()
    assert transfer.state is TransferState.TRANSFERRING
    before = time.monotonic()
    assert transfer._finish(TransferState.FAILED, "lost")
    finished = transfer.finished_s
    assert not transfer._finish(TransferState.DONE)
    assert (transfer.state, transfer.error) == (TransferState.FAILED, "lost")
    assert before <= finished == transfer.finished_s <= time.monotonic()


def test_done_callbacks_run_once_at_the_terminal_state():
    transfer, seen = make(), []
    transfer.add_done_callback(lambda t: seen.append(("early", t.state)))
    transfer._moving()
    assert seen == []
    transfer._finish(TransferState.DONE)
    transfer._finish(TransferState.FAILED, "too late")
    transfer.add_done_callback(lambda t: seen.append(("late", t.state)))  # already terminal: at once
    assert seen == [("early", TransferState.DONE), ("late", TransferState.DONE)]


def test_wait_and_wait_async_see_the_terminal_state():
    transfer = make()
    assert transfer.wait(0.01) is TransferState.PENDING
    threading.Timer(0.05, transfer._finish, (TransferState.DONE,)).start()

    async def waiter():
        return await transfer.wait_async()

    assert asyncio.run(waiter()) is TransferState.DONE
    assert transfer.wait(0) is TransferState.DONE


def test_release_runs_the_callback_once_then_reports_released():
    released = []
    transfer = make(on_release=lambda: released.append("released"))
    transfer._finish(TransferState.CANCELLED, "bye")
    assert not transfer.blocks_released
    transfer._release()
    assert released == ["released"] and transfer.blocks_released and transfer.wait_released(0)


def test_cancel_goes_to_the_owner():
    cancels = []
    make(cancels=cancels).cancel("client left")
    assert cancels == [("t", "client left")]


def test_deadline_clock_fires_in_deadline_order():
    from kv_transfer.transfer import DeadlineClock

    fired = []
    clock = DeadlineClock(fired.append, "test-clock")
    now = time.monotonic()
    clock.add("late", now + 0.15)
    clock.add("early", now + 0.05)
    time.sleep(0.3)
    clock.close()
    assert fired == ["early", "late"]


def test_registry_names_the_choices_and_imports_lazily():
    assert set(backend_names()) >= {"nixl", "torch_dist", "shm"}
    with pytest.raises(ValueError, match=r"unknown KV transfer backend 'rdma'; choose one of"):
        load_backend("rdma")
    code = (
        "import sys, kv_transfer; from kv_transfer import load_backend; "
        "assert not any(m.startswith(('nixl', 'torch', 'kv_transfer.backends.')) for m in sys.modules); "
        "load_backend('shm'); assert 'kv_transfer.backends.shm' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_transport_refuses_a_cache_unlike_its_layout():
    from tests.kv_transfer.peer import TEST_SECRET, make_layout

    layout = make_layout()
    shm = load_backend("shm")
    with pytest.raises(ValueError, match=r"cache must be bfloat16 with shape \(4, 2, 24, 4, 4, 16\)"):
        shm(torch.zeros(layout.shape, dtype=torch.float16), layout, "send", TEST_SECRET)
    with pytest.raises(ValueError, match="cache must be contiguous on cpu"):
        shm(
            torch.zeros(layout.shape[::-1], dtype=torch.bfloat16).permute(5, 4, 3, 2, 1, 0), layout, "send", TEST_SECRET
        )
