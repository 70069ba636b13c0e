"""Built-in GPU specifications for the analytical (roofline) latency model.

Figures are the vendors' datasheet numbers: dense tensor-core throughput (no 2:4 sparsity),
HBM/GDDR bandwidth, memory size, and the GPU-to-GPU link inside a server (NVLink where the
usual server form has it, PCIe otherwise). Prices are rough on-demand cloud prices per GPU
hour (2024), only defaults for the cost objective: a cluster file overrides them per node.

Turing (T4) and Volta (V100) have no bfloat16 tensor cores; engines run bfloat16 models on
them in float16, so their float16 rate stands in for bfloat16.

`cpu` is a device too: one CPU core (a node's `num_gpus` counts its cores; `tandem serve`
runs each rank of such an instance as a CPU worker on a core of its own). It has no
datasheet for the roofline, so its latency must come from a profile measured on one core
(`tandem profile --device cpu --cores 1`); its memory per core is the cluster file's
`gpu_memory_gb`, or CPU_MEMORY_GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.cluster import NodeSpec


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float  # per GPU
    mem_bw_gb_s: float  # device memory bandwidth, GB/s
    tflops: tuple[tuple[str, float], ...]  # (dtype, dense peak TFLOP/s); float32 without TF32
    link_gb_s: float  # GPU-to-GPU bandwidth in a server, one direction, GB/s
    nvlink: bool  # whether link_gb_s is NVLink (lower collective latency than PCIe)
    cost_per_hour: float  # default price per GPU hour, USD

    @property
    def has_roofline(self) -> bool:
        """Whether the table has the peaks the roofline needs (not for cpu: profile only)."""
        return bool(self.tflops)

    def peak_flops(self, dtype: str) -> float:
        if not self.has_roofline:
            raise ValueError(f"gpu_type {self.name!r} has no datasheet for the roofline latency model: {PROFILE_FIX}")
        return dict(self.tflops)[dtype] * 1e12


def _gpu(name, memory_gb, mem_bw_gb_s, fp16, fp32, link_gb_s, nvlink, cost) -> GPUSpec:
    # Every GPU here runs bfloat16 at its float16 rate (natively, or as float16 on T4/V100).
    tflops = (("float16", fp16), ("bfloat16", fp16), ("float32", fp32))
    return GPUSpec(name, memory_gb, mem_bw_gb_s, tflops, link_gb_s, nvlink, cost)


# One CPU core as a device. Memory: what a core's worker may use for weights and KV (the
# engine's CPU worker holds 1 GiB of KV by default); a cluster file's gpu_memory_gb says
# what a node really gives each core. Link: KV between two workers of one machine goes
# through host memory over a local socket, a few GB/s. Price: about a cloud vCPU hour.
CPU_MEMORY_GB = 2.0
CPU_LINK_GB_S = 5.0
CPU_COST_PER_CORE_HOUR = 0.05
PROFILE_FIX = (
    "its latency must come from a profile of the model measured on one core: run "
    "`tandem profile --device cpu --cores 1 --model <checkpoint> --out profile.yaml` and plan "
    "with --profile profile.yaml"
)

GPU_SPECS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        #    name         mem GB  HBM GB/s  fp16 TF  fp32 TF  link GB/s  NVLink  $/h
        _gpu("H200", 141.0, 4800.0, 989.0, 67.0, 450.0, True, 10.0),
        _gpu("H100", 80.0, 3350.0, 989.0, 67.0, 450.0, True, 6.0),
        _gpu("A100-80GB", 80.0, 2039.0, 312.0, 19.5, 300.0, True, 3.7),
        _gpu("A100-40GB", 40.0, 1555.0, 312.0, 19.5, 300.0, True, 3.0),
        _gpu("L40S", 48.0, 864.0, 362.0, 91.6, 32.0, False, 1.9),
        _gpu("A10G", 24.0, 600.0, 70.0, 31.2, 32.0, False, 1.0),
        _gpu("L4", 24.0, 300.0, 121.0, 30.3, 32.0, False, 0.8),
        _gpu("V100", 32.0, 900.0, 125.0, 15.7, 150.0, True, 2.5),
        _gpu("T4", 16.0, 320.0, 65.0, 8.1, 16.0, False, 0.5),
        GPUSpec("cpu", CPU_MEMORY_GB, 0.0, (), CPU_LINK_GB_S, False, CPU_COST_PER_CORE_HOUR),
    )
}

GPU_TYPES = tuple(GPU_SPECS)


def gpu_spec(name: str, where: str = "gpu_type") -> GPUSpec:
    try:
        return GPU_SPECS[name]
    except KeyError:
        raise ValueError(f"{where} {name!r} is not a known GPU type; known: {', '.join(GPU_TYPES)}") from None


@dataclass(frozen=True)
class NodeHardware:
    """A node's GPUs with the cluster file's overrides applied to the table's figures."""

    gpu: GPUSpec
    memory_bytes: float  # per GPU
    link_gb_s: float  # GPU-to-GPU inside the node
    cost_per_gpu_hour: float


def node_hardware(node: NodeSpec) -> NodeHardware:
    gpu = gpu_spec(node.gpu_type, f"cluster.nodes[{node.name}].gpu_type")
    return NodeHardware(
        gpu=gpu,
        memory_bytes=(node.gpu_memory_gb or gpu.memory_gb) * 1e9,
        link_gb_s=node.intra_node_gb_s or gpu.link_gb_s,
        cost_per_gpu_hour=gpu.cost_per_hour if node.cost_per_gpu_hour is None else node.cost_per_gpu_hour,
    )
