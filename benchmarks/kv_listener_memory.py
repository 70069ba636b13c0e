"""What connections that never authenticate cost a KV receiver: its memory, measured.

A receiver runs alone in a child process (as a decode worker's would), with a small cache.
This process opens 100 connections to it of each kind, keeps them open, and reads the
child's resident memory after each batch:

  header: 4 bytes announcing a 64 MiB message (a receiver that trusts it allocates 64 MiB)
  idle:   connect and say nothing
  junk:   4 KiB of random bytes

    .venv/bin/python benchmarks/kv_listener_memory.py [--tree PATH] [--connections 100]

--tree runs the receiver of another checkout (e.g. a `git worktree` of an older commit, as
the baseline); that tree's KVReceiver is used as it is, with a secret only if it takes one.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

KINDS = ("header", "idle", "junk")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _receiver(tree: str, conn) -> None:
    sys.path.insert(0, tree)
    import torch

    from kv_transfer import KVReceiver
    from proto.kv import KVLayout

    layout = KVLayout(
        model_id="bench@1",
        num_layers=4,
        total_num_kv_heads=2,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        num_blocks=64,
        dtype="bfloat16",
        device="cpu",
    )
    kwargs: dict[str, Any] = {"secret": os.urandom(32)} if "secret" in inspect.signature(KVReceiver).parameters else {}
    receiver = KVReceiver("shm", torch.zeros(layout.shape, dtype=torch.bfloat16), layout, **kwargs)
    conn.send(receiver.endpoint)
    conn.recv()  # until told to stop
    receiver.close()


def _open(endpoint: str, kind: str) -> socket.socket:
    host, port = endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        if kind == "header":
            sock.sendall(struct.pack("!I", 64 << 20))
        elif kind == "junk":
            sock.sendall(os.urandom(4096))
    except OSError:
        pass  # closed by the receiver already
    return sock


def measure(tree: str, num_connections: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(tree, child), daemon=True)
    proc.start()
    pid = proc.pid
    assert pid is not None, "a started process has a pid"
    endpoint = parent.recv()
    time.sleep(1.0)
    rows = {"start": _rss_mib(pid)}
    held = []
    for kind in KINDS:
        held += [_open(endpoint, kind) for _ in range(num_connections)]
        time.sleep(2.0)  # let the receiver's threads do whatever they do with them
        rows[kind] = _rss_mib(pid)
    alive = 0
    for sock in held:  # read what the receiver sent (a challenge, perhaps); closed shows as EOF
        sock.setblocking(False)
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            alive += 1  # still open
        except OSError:
            pass
        sock.close()
    rows["still_open"] = alive
    parent.send(None)
    proc.join(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tree",
        default=str(Path(__file__).resolve().parents[1]),
        help="checkout whose kv_transfer to run (default: this one)",
    )
    parser.add_argument("--connections", type=int, default=100, help="connections of each kind")
    args = parser.parse_args()
    rows = measure(args.tree, args.connections)
    print(f"receiver from {args.tree}; load average {os.getloadavg()[0]:.2f}")
    print("| after | receiver RSS (MiB) | grown (MiB) |\n|---|---|---|")
    for key in ("start", *KINDS):
        label = "start" if key == "start" else f"+{args.connections} {key} connections"
        print(f"| {label} | {rows[key]:.0f} | {rows[key] - rows['start']:.0f} |")
    print(
        f"connections the receiver still held open at the end: {rows['still_open']} of {len(KINDS) * args.connections}"
    )


if __name__ == "__main__":
    main()
