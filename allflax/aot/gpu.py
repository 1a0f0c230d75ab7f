"""NVIDIA GPUs described from their published specifications, for compiling without one.

XLA compiles for a GPU it cannot see from a `GpuTargetConfigProto` (what the driver would report:
compute capability, SMs, shared memory, ...). XLA keeps such files for a few GPUs in its source
tree, not in the wheels, and the 0.10.2 plugin rejects fields its newer ones have; there is none
for T4 or L4. So each target here is written from its datasheet and the CUDA programming guide,
with only the fields that plugin knows (xla/stream_executor/device_description.proto).
"""
import dataclasses
import importlib.util
import re

from jax.experimental import topologies

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str  # As in --topology: t4, 8xh100.
    device_kind: str  # What JAX (and nvidia-smi) call it.
    memory_mib: int  # nvidia-smi's memory.total: what the driver exposes of the nominal GB.
    # Dense (no 2:4 sparsity) tensor-core peak per dtype, FLOP/s; float32 is what XLA runs float32
    # convolutions and dots in by default: TF32 tensor cores from Ampere on, plain FP32 before.
    peak_flops: dict
    memory_bytes_per_second: float
    compute_capability: tuple[int, int]
    sms: int
    fp32_lanes_per_sm: int
    l2_bytes: int
    boost_clock_ghz: float

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


# Sources, per GPU (dense peaks are half the datasheets' "with sparsity" figures):
# - P100 (PCIe 16 GB, Kaggle's): NVIDIA Tesla P100 datasheet: 9.3 TFLOPS FP32, 18.7 FP16 (two per
#   FP32 lane: Pascal has no tensor cores), 16 GB HBM2 at 732 GB/s; Pascal whitepaper (GP100 as
#   P100 PCIe): 56 SMs of 64 FP32 cores, 4 MB L2, 1,303 MHz boost. No bfloat16.
# - T4: NVIDIA T4 datasheet: 65 TFLOPS mixed precision FP16/FP32, 8.1 TFLOPS FP32, 16 GB GDDR6,
#   320 GB/s; Turing whitepaper: 40 SMs of 64 FP32 cores, 4 MB L2, 1,590 MHz boost. No bfloat16.
# - L4: NVIDIA L4 datasheet: BF16/FP16 242 TFLOPS and TF32 120 TFLOPS with sparsity, 24 GB GDDR6,
#   300 GB/s; Ada whitepaper (AD104 as L4): 58 SMs of 128 FP32 cores, 48 MB L2, 2,040 MHz boost.
# - A100 (SXM4): NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS, TF32 156 TFLOPS; 40 GB HBM2 at
#   1,555 GB/s, 80 GB HBM2e at 2,039 GB/s; Ampere whitepaper: 108 SMs of 64 FP32 cores, 40 MB L2,
#   1,410 MHz boost.
# - H100 (SXM5): NVIDIA H100 datasheet: BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity,
#   80 GB HBM3 at 3.35 TB/s; Hopper whitepaper: 132 SMs of 128 FP32 cores, 50 MB L2, 1,980 MHz.
# - H200 (SXM): NVIDIA H200 datasheet: the H100's peaks, 141 GB HBM3e at 4.8 TB/s; the same GH100
#   chip as the H100 SXM5 (132 SMs, 50 MB L2).
# memory_mib: nvidia-smi's memory.total on those cards (Colab's T4, L4 and A100 runtimes, Kaggle's
# P100; the SXM A100 80 GB, H100 80 GB HBM3 and H200).
GPUS = {gpu.name: gpu for gpu in (
    Gpu('p100', 'Tesla P100-PCIE-16GB', 16280, {'float16': 18.7e12, 'float32': 9.3e12}, 732e9, (6, 0), 56, 64,
        4 * 2 ** 20, 1.303),
    Gpu('t4', 'Tesla T4', 15360, {'float16': 65e12, 'float32': 8.1e12}, 320e9, (7, 5), 40, 64, 4 * 2 ** 20, 1.59),
    Gpu('l4', 'NVIDIA L4', 23034, {'bfloat16': 121e12, 'float16': 121e12, 'float32': 60e12}, 300e9, (8, 9), 58,
        128, 48 * 2 ** 20, 2.04),
    Gpu('a100-40gb', 'NVIDIA A100-SXM4-40GB', 40960, {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12},
        1555e9, (8, 0), 108, 64, 40 * 2 ** 20, 1.41),
    Gpu('a100-80gb', 'NVIDIA A100-SXM4-80GB', 81920, {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12},
        2039e9, (8, 0), 108, 64, 40 * 2 ** 20, 1.41),
    Gpu('h100', 'NVIDIA H100 80GB HBM3', 81559, {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494e12},
        3350e9, (9, 0), 132, 128, 50 * 2 ** 20, 1.98),
    Gpu('h200', 'NVIDIA H200', 143771, {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494e12},
        4800e9, (9, 0), 132, 128, 50 * 2 ** 20, 1.98),
)}
# The notebook runtimes these hosts are, by --topology: Colab's (its free tier has the T4) and
# Kaggle's (free, within weekly hours).
RUNTIMES = {'t4': 'Colab, free', 'l4': 'Colab', 'a100-40gb': 'Colab', '2xt4': 'Kaggle, free', 'p100': 'Kaggle, free'}
# Per compute capability, from the CUDA C++ Programming Guide's table of technical specifications:
# resident threads per SM, shared memory per SM, and the most one block may opt in to (bytes;
# 6.0 has no opt-in beyond the 48 KB every block gets).
_SM_LIMITS = {(6, 0): (2048, 64 * 1024, 48 * 1024), (7, 5): (1024, 64 * 1024, 64 * 1024), (8, 0): (2048, 164 * 1024, 163 * 1024),
              (8, 9): (1536, 100 * 1024, 99 * 1024), (9, 0): (2048, 228 * 1024, 227 * 1024)}
# The CUDA and cuDNN versions the compiled program is for: those JAX 0.10.2's CUDA 12 plugin needs.
_CUDA_RUNTIME, _CUDNN = (12, 8), (9, 8)


def parse(topology: str) -> tuple[Gpu, int]:
    """'h100' (one GPU) or '8xh100' (one host with 8): the GPU and how many."""
    match = re.fullmatch(r'(?:(\d+)x)?([a-z0-9-]+)', topology)
    count = int(match.group(1) or 1) if match else 0
    if not match or match.group(2) not in GPUS or count < 1:
        raise ValueError(f"unknown GPU target {topology!r}: expected '[<count>x]<gpu>' such as t4 or 8xh100, "
                         f"with gpu one of {', '.join(GPUS)} (TPU topologies are '<chip>:<shape>', e.g. v5e:1x1)")
    return GPUS[match.group(2)], count


def by_device_kind(device_kind: str) -> Gpu | None:
    """The GPU that JAX names `device_kind` on a real one ('NVIDIA H100 80GB HBM3'), if known."""
    return next((gpu for gpu in GPUS.values() if gpu.device_kind == device_kind), None)


def target_config(gpu: Gpu) -> str:
    """The GpuTargetConfigProto, as text, that XLA compiles for `gpu` with."""
    threads_per_sm, shared_per_sm, shared_per_block_optin = _SM_LIMITS[gpu.compute_capability]
    major, minor = gpu.compute_capability
    info = {
        'threads_per_block_limit': 1024, 'threads_per_warp': 32, 'shared_memory_per_block': 48 * 1024,
        'shared_memory_per_core': shared_per_sm, 'threads_per_core_limit': threads_per_sm, 'core_count': gpu.sms,
        'fpus_per_core': gpu.fp32_lanes_per_sm, 'block_dim_limit_x': 2 ** 31 - 1, 'block_dim_limit_y': 65535,
        'block_dim_limit_z': 65535, 'memory_bandwidth': int(gpu.memory_bytes_per_second),
        'l2_cache_size': gpu.l2_bytes, 'clock_rate_ghz': gpu.boost_clock_ghz,
        'device_memory_size': gpu.memory_mib * 2 ** 20, 'shared_memory_per_block_optin': shared_per_block_optin,
        'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
    }
    fields = '\n'.join(f'  {key}: {value}' for key, value in info.items())
    return (f'gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n'
            f'platform_name: "CUDA"\n'
            f'dnn_version_info {{ major: {_CUDNN[0]} minor: {_CUDNN[1]} }}\n'
            f'runtime_version {{ major: {_CUDA_RUNTIME[0]} minor: {_CUDA_RUNTIME[1]} }}\n'
            f'device_description_str: "{gpu.device_kind}"\n')


def devices(topology: str) -> tuple[Gpu, list]:
    """The GPU of `topology` and the devices of one host with that many, from JAX's CUDA plugin."""
    gpu, count = parse(topology)
    if importlib.util.find_spec('jax_plugins.xla_cuda12') is None:
        raise ValueError('the CUDA plugin is not installed: it compiles for GPUs on this host. '
                         'pip install -r requirements-test.txt (jax-cuda12-plugin, nvidia-cuda-nvcc-cu12)')
    found = topologies.get_topology_desc(platform='cuda', topology=f'1x1x{count}',
                                         target_config=target_config(gpu)).devices
    return gpu, found
