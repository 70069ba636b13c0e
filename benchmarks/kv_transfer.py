"""KV transfer benchmark: every backend beside a plain torch copy of the same bytes.

(a) Throughput and latency of moving Llama-3-8B-shaped KV (32 layers, 8 KV heads, head dim
    128, bfloat16, block size 16: 128 KiB per token) from a sender process to a receiver
    process, at 128, 2,048 and 32,768 tokens. Latency runs from KVSender.start() to the
    receiver's DONE, all layers pushed at once; bandwidth is bytes / latency.
(b) With the engine: a 2,048-token prefill of a small model with the same KV shape, pushing
    each layer from the model's on_layer_stored hook. Exposed time is what is left of the
    transfer after the last layer's compute (receiver DONE - last layer stored), compared
    with the same transfer alone and with the prefill time. The prefill computes on all
    cores but one, which is left to the transfer (see _open_engine).

    .venv/bin/python benchmarks/kv_transfer.py [--backends shm nixl torch_dist] [--quick]
                                               [--only bandwidth|exposed] [--small-pages]

CPU tensors (caches, and the plain copy's buffers alike) are allocated on 2 MiB pages, as a
CPU server should hold its KV cache: NIXL's same-host path (UCX CMA) pins every remote page
it writes, and moves about 7 GiB/s on 4 KiB pages against 13 GiB/s on 2 MiB pages here.
--small-pages measures 4 KiB pages instead. OpenMP threads wait passively (see below).

Prints markdown tables (docs/kv_transfer.md holds a run) and writes
benchmarks/results/kv_transfer.json. Needs about 12 GiB of free memory at 32,768 tokens
(two 4 GiB caches and the plain copy's 4 GiB source).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Read when torch loads; spawned senders inherit both. OpenMP threads otherwise spin
    # after every parallel region (the plain copy's, the model's) and hold the cores that the
    # transfer's threads need: measured, a 256 MiB transfer right after a copy took 5 ms longer.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "--small-pages" not in sys.argv:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # PyTorch's switch for 2 MiB pages

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import markdown_table  # noqa: E402
from kv_transfer import KVReceiver, KVSender, TransferState, backend_names, new_secret  # noqa: E402
from proto.kv import KVLayout  # noqa: E402

SHAPE: dict[str, Any] = dict(
    num_layers=32, total_num_kv_heads=8, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16"
)
TOKENS = (128, 2048, 32768)
REPS = {128: 20, 2048: 20, 32768: 3}
PREFILL_TOKENS, PREFILL_RUNS = 2048, 5
TIMEOUT_S = 300.0
RESULTS = Path(__file__).resolve().parent / "results" / "kv_transfer.json"


def kv_layout(model_id: str, num_blocks: int) -> KVLayout:
    return KVLayout(model_id=model_id, num_blocks=num_blocks, **SHAPE)


def random_bytes(num_bytes: int) -> torch.Tensor:
    """Random content: constant or untouched memory can be served by shared (zero or merged)
    pages from cache, which would flatter every copy of it."""
    data = torch.empty(num_bytes, dtype=torch.uint8)
    data.view(torch.int64).random_(generator=torch.Generator().manual_seed(num_bytes))
    return data


def marked_cache(layout: KVLayout) -> torch.Tensor:
    """A random cache whose (layer, K|V, block b) chunks each end with the int16 b: checkable."""
    cache = random_bytes(int(torch.Size(layout.shape).numel()) * 2).view(torch.bfloat16)
    chunks = cache.view(torch.int16).view(layout.num_layers * 2, layout.num_blocks, -1)
    chunks[:, :, -1] = torch.arange(layout.num_blocks, dtype=torch.int16)
    return cache.view(layout.shape)


def timed_copy_s(src: torch.Tensor, dst: torch.Tensor) -> float:
    """One contiguous torch copy_ of src into dst: the same-host ceiling for moving those bytes."""
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start


# The sender process: commands over a pipe, so that both ends are real processes.


def _sender_main(conn) -> None:
    sender = engine = None
    while (request := conn.recv()) is not None:
        command, args = request
        if command == "open":
            backend, layout, endpoint, secret = args
            sender = KVSender(backend, marked_cache(layout), layout, secret=secret)
            sender.connect(endpoint)
            conn.send(None)
        elif command == "engine":
            backend, model_dir, endpoint, secret = args
            engine, sender = _open_engine(backend, model_dir, endpoint, secret)
            conn.send(None)
        elif command == "send":
            assert sender is not None, "'open' comes first"
            transfer_id, src_ids, endpoint = args
            start = time.monotonic()
            transfer = sender.start(transfer_id, src_ids, [endpoint], TIMEOUT_S)
            for layer in range(sender.layout.num_layers):
                sender.push_layer(transfer_id, layer)
            transfer.wait_released(TIMEOUT_S)
            conn.send((start, transfer.state.value, transfer.error))
        elif command == "prefill":
            assert engine is not None and sender is not None, "'engine' comes first"
            conn.send(_prefill_and_push(engine, sender, *args))
        elif command == "release":
            assert engine is not None, "'engine' comes first"
            engine.release(args[0])
            conn.send(None)
    if sender is not None:
        sender.close()


def _open_engine(backend: str, model_dir: str, endpoint: str, secret: bytes):
    from engine import EngineConfig, LLMEngine, SamplingParams

    # On a CPU, compute and the transfer share the cores: one core is left to the transfer,
    # as a GPU leaves copies to its DMA engines. With every core computing, the transfer
    # thread stalls the model's parallel regions and the other way round (measured: the
    # forward's tail after the last layer grew from 4 to 60 ms on 2 cores).
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    config = EngineConfig(
        dtype="bfloat16",
        device="cpu",
        max_num_seqs=1,
        max_num_batched_tokens=PREFILL_TOKENS,
        max_model_len=2 * PREFILL_TOKENS,
        num_blocks=2 * PREFILL_TOKENS // SHAPE["block_size"],
        enable_prefix_caching=False,
    )
    engine = LLMEngine(model_dir, config)
    engine.add_request("warm-up", _prompt(), SamplingParams(max_tokens=1))
    engine.step()  # the first forward pays one-time costs; not measured
    sender = KVSender(backend, engine.kv_cache.tensor, engine.kv_cache.layout, secret=secret)
    sender.connect(endpoint)
    return engine, sender


def _prompt() -> list[int]:
    return torch.randint(2, 1024, (PREFILL_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


def _prefill_and_push(engine, sender: KVSender, request_id: str, endpoint: str) -> dict:
    """The prefill worker's loop for one request: schedule, start the transfer, run with the hook."""
    from engine import SamplingParams

    engine.add_request(request_id, _prompt(), SamplingParams(max_tokens=1), hold_blocks=True)
    scheduled = engine.schedule()
    (item,) = scheduled.scheduled
    src_ids = list(item.seq.block_ids)
    transfer = sender.start(request_id, src_ids, [endpoint], TIMEOUT_S)
    stored = []

    def on_layer_stored(layer_idx: int) -> None:
        sender.push_layer(request_id, layer_idx)
        stored.append(time.monotonic())

    start = time.monotonic()
    engine.run(scheduled, on_layer_stored)
    end = time.monotonic()
    transfer.wait_released(TIMEOUT_S)
    return {
        "src_ids": src_ids,
        "forward_start": start,
        "last_layer": stored[-1],
        "forward_end": end,
        "state": transfer.state.value,
    }


class SenderProcess:
    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_sender_main, args=(child,), daemon=True)
        self.process.start()

    def call(self, command: str, *args):
        self.conn.send((command, args))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(60)


def timed_transfer(
    receiver: KVReceiver, sender: SenderProcess, transfer_id: str, src_ids: list[int], dst_ids: list[int]
) -> float:
    """Seconds from the sender's start() to the receiver's DONE."""
    transfer = receiver.expect(transfer_id, dst_ids, TIMEOUT_S)
    sender.conn.send(("send", (transfer_id, src_ids, receiver.endpoint)))
    state = transfer.wait(TIMEOUT_S)
    start, sent_state, error = sender.conn.recv()
    if state is not TransferState.DONE or sent_state != "done":
        raise RuntimeError(f"transfer {transfer_id} ended {state} / {sent_state}: {error}")
    return transfer.finished_s - start  # monotonic clocks agree across processes on one host


def bandwidth_rows(backend: str, tokens: tuple[int, ...], reps: dict[int, int]) -> list[dict]:
    """One row per (size, block map). Each transfer is paired with a plain copy of as many bytes
    run just before it, so that both see the same load on a shared machine."""
    num_blocks = max(tokens) // SHAPE["block_size"]
    layout = kv_layout("llama-3-8b-shape", num_blocks)
    cache = torch.empty(layout.shape, dtype=torch.bfloat16)  # untouched pages: no copy into shm
    secret = new_secret()
    receiver = KVReceiver(backend, cache, layout, secret=secret)
    sender = SenderProcess()
    rows = []
    try:
        sender.call("open", backend, layout, receiver.endpoint, secret)
        timed_transfer(receiver, sender, "warm-up", [0], [0])
        block_size = SHAPE["block_size"]
        maps = [(n, "contiguous", list(range(n // block_size)), list(range(n // block_size))) for n in tokens]
        if 2048 in tokens:  # a fragmented cache: every block its own chunk
            perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
            count = 2048 // block_size
            maps.insert(2, (2048, "random", perm[:count], perm[-count:]))
        for n, kind, src_ids, dst_ids in maps:
            num_bytes = n * layout.bytes_per_token
            # The plain copy lands as many bytes in the same memory as the transfer: the
            # receiver's cache (shared memory for shm), from an ordinary tensor.
            copy_src = random_bytes(num_bytes)
            copy_dst = cache.view(-1).view(torch.uint8)[:num_bytes]
            copies, transfers = [], []
            for i in range(reps[n] + 1):
                copies.append(timed_copy_s(copy_src, copy_dst))
                transfers.append(timed_transfer(receiver, sender, f"{kind}-{n}-{i}", src_ids, dst_ids))
            del copy_src
            view = cache.view(torch.int16).view(layout.num_layers * 2, num_blocks, -1)
            assert all(int(view[-1, d, -1]) == s for s, d in zip(src_ids, dst_ids, strict=True)), "bad bytes"
            # The first pair faults in the pages it touches: dropped.
            latency, copy = statistics.median(transfers[1:]), statistics.median(copies[1:])
            rows.append(
                {
                    "backend": backend,
                    "tokens": n,
                    "map": kind,
                    "mib": num_bytes / 2**20,
                    "latency_ms": 1e3 * latency,
                    "gib_s": num_bytes / latency / 2**30,
                    "copy_gib_s": num_bytes / copy / 2**30,
                    "vs_copy": copy / latency,
                }
            )
    finally:
        sender.close()
        receiver.close()
    return rows


def make_model(root: Path) -> Path:
    """A random Llama with Llama-3-8B's KV shape and small weights, so that CPU prefill is seconds."""
    import transformers

    path = root / "llama-3-8b-kv-shape"
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).bfloat16().save_pretrained(str(path))
    return path


def exposed_row(backend: str, model_dir: Path, runs: int) -> dict:
    from engine.config import ModelConfig

    num_blocks = PREFILL_TOKENS // SHAPE["block_size"]
    layout = kv_layout(ModelConfig.from_dir(model_dir).model_id, num_blocks)
    secret = new_secret()
    receiver = KVReceiver(backend, torch.empty(layout.shape, dtype=torch.bfloat16), layout, secret=secret)
    sender = SenderProcess()
    dst_ids = list(range(num_blocks))
    samples = []
    try:
        sender.call("engine", backend, str(model_dir), receiver.endpoint, secret)
        timed_transfer(receiver, sender, "warm-up", dst_ids, dst_ids)  # faults in the pages
        for run in range(runs):
            request_id = f"prefill-{run}"
            transfer = receiver.expect(request_id, dst_ids, TIMEOUT_S)
            sender.conn.send(("prefill", (request_id, receiver.endpoint)))
            state = transfer.wait(TIMEOUT_S)
            done = transfer.finished_s
            prefill = sender.conn.recv()
            assert state is TransferState.DONE and prefill["state"] == "done", (state, prefill)
            alone = timed_transfer(receiver, sender, f"alone-{run}", prefill["src_ids"], dst_ids)
            sender.call("release", request_id)
            samples.append(
                {
                    "prefill_s": prefill["forward_end"] - prefill["forward_start"],
                    "exposed_s": done - prefill["last_layer"],
                    "alone_s": alone,
                }
            )
    finally:
        sender.close()
        receiver.close()
    median = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return {
        "backend": backend,
        "prefill_ms": 1e3 * median["prefill_s"],
        "alone_ms": 1e3 * median["alone_s"],
        "exposed_ms": 1e3 * median["exposed_s"],
        "exposed_vs_transfer": median["exposed_s"] / median["alone_s"],
        "exposed_vs_prefill": median["exposed_s"] / median["prefill_s"],
        "runs": samples,
    }


def print_tables(rows: list[dict], exposed: list[dict]) -> None:
    if rows:
        print(
            "\n"
            + markdown_table(
                ["backend", "tokens", "block map", "MiB", "latency ms", "GiB/s", "plain copy GiB/s", "x plain copy"],
                [
                    [
                        r["backend"],
                        f"{r['tokens']:,}",
                        r["map"],
                        f"{r['mib']:,.0f}",
                        f"{r['latency_ms']:.2f}",
                        f"{r['gib_s']:.2f}",
                        f"{r['copy_gib_s']:.2f}",
                        f"{r['vs_copy']:.2f}",
                    ]
                    for r in rows
                ],
            )
        )
    if exposed:
        print(
            "\n"
            + markdown_table(
                [
                    "backend",
                    f"prefill ms ({PREFILL_TOKENS:,} tokens)",
                    "transfer alone ms",
                    "exposed after last layer ms",
                    "exposed / transfer",
                    "exposed / prefill",
                ],
                [
                    [
                        r["backend"],
                        f"{r['prefill_ms']:,.0f}",
                        f"{r['alone_ms']:.1f}",
                        f"{r['exposed_ms']:.2f}",
                        f"{r['exposed_vs_transfer']:.3f}",
                        f"{r['exposed_vs_prefill']:.5f}",
                    ]
                    for r in exposed
                ],
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(backend_names()), choices=backend_names())
    parser.add_argument(
        "--quick", action="store_true", help="128 and 2,048 tokens only, fewer repetitions, one prefill run"
    )
    parser.add_argument(
        "--only", choices=("bandwidth", "exposed"), help="run one part: (a) bandwidth or (b) exposed transfer time"
    )
    parser.add_argument(
        "--small-pages", action="store_true", help="allocate CPU tensors on 4 KiB pages instead of 2 MiB ones"
    )
    args = parser.parse_args()
    tokens = TOKENS[:2] if args.quick else TOKENS
    reps = {n: max(2, r // 4) for n, r in REPS.items()} if args.quick else REPS
    rows, exposed = [], []
    if args.only != "exposed":
        rows = [row for b in args.backends for row in bandwidth_rows(b, tokens, reps)]
    if args.only != "bandwidth":
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_model(Path(tmp))
            exposed = [exposed_row(b, model_dir, 1 if args.quick else PREFILL_RUNS) for b in args.backends]
    print_tables(rows, exposed)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bandwidth": rows,
                "exposed": exposed,
                "threads": torch.get_num_threads(),
                "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
