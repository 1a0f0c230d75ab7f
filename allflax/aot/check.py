"""Will a recipe fit a TPU or a GPU, and how fast could it go? Compiles its train and eval steps
for a TPU topology or a GPU host on this CPU host, ahead of time (libtpu or the CUDA plugin, no
accelerator), and reports per-device memory against capacity, FLOPs per image and a roofline bound
on images/s.

  python -m allflax.aot.check --config=configs/efficientnetv2_b3_se.py:tpu --topology=v5e:1x1 \
      [--steps=train,eval] [--output=benchmarks/tpu_check/b3_v5e.json]
  python -m allflax.aot.check --config=configs/vgg19_mhsa.py:gpu --topology=8xh100    # or l4, a100-40gb, ...
  python -m allflax.aot.check --config=configs/vgg19_mhsa.py:gpu,t4 --topology=2xt4   # Kaggle's T4 x2
  python -m allflax.aot.check --table=benchmarks/gpu_check    # The README's table of those JSONs.

The programs are the ones training runs (`loop.make_train_step`, `loop.make_eval_step`) over a
mesh of the target's devices, with the recipe's global batch split over them. `allflax.aot.check`
is this module's former name.
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import time

# Before JAX is imported: with libtpu installed, JAX would otherwise look for a local TPU first
# (and take /tmp/libtpu_lockfile, failing any other process that loads libtpu), and the CUDA plugin
# for a driver. This host only compiles for the target, on its CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from jax._src.lib import _jax  # noqa: E402  XLA's HLO cost analysis, as Lowered.cost_analysis calls it.
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from allflax import files, runtime, sharding  # noqa: E402
from allflax.aot import gpu as gpu_targets  # noqa: E402
from allflax.data.sources import all_aria, all_idb2, cnmc2019, synthetic  # noqa: E402
from allflax.training import loop  # noqa: E402

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # As in topology strings and Cloud TPU's accelerator types.
    device_kind: str  # What JAX calls its devices.
    hbm_gib: float  # Per chip.
    peak_bf16_flops: float  # Per chip, per second.
    hbm_bytes_per_second: float  # Per chip.
    chip_config_name: str = 'default'  # libtpu's chip config: 'megacore' shows a chip's 2 cores as one device.
    cores_in_type_name: int = 1  # Cloud's accelerator types count cores (v2-8: 4 chips) or chips (v5e-8).


# Per chip, from Google Cloud's "TPU versions" pages (cloud.google.com/tpu/docs/v3, v4, v5e,
# v5p, v6e): v3 "123 teraflops (bf16); 32 GiB, 900 GBps"; v4 "275 teraflops; 32 GiB, 1200 GBps";
# v5e "197 TFLOPs; 16 GB, 819 GBps"; v5p "459 TFLOPs; 95 GB, 2765 GBps"; v6e "918 TFLOPs; 32 GB,
# 1638 GBps". The v2 page no longer lists them and points to Jouppi et al., "A Domain Specific
# Supercomputer for Training Deep Neural Networks" (CACM 2020): 16 GiB (8 per core), 700 GB/s;
# 45 TFLOP/s bf16 is the figure Cloud published for v2. Capacities are read as GiB, bandwidths
# as 10^9 bytes/s. v2 and v3 chips have 2 TensorCores that JAX shows as 2 devices, each with half
# the chip; v4 and v5p chips also have 2, fused into one device (megacore) as on their hosts.
CHIPS = {chip.name: chip for chip in (
    Chip('v2', 'TPU v2', 16, 45e12, 700e9, cores_in_type_name=2),
    Chip('v3', 'TPU v3', 32, 123e12, 900e9, cores_in_type_name=2),
    Chip('v4', 'TPU v4', 32, 275e12, 1200e9, chip_config_name='megacore', cores_in_type_name=2),
    Chip('v5e', 'TPU v5 lite', 16, 197e12, 819e9),
    Chip('v5p', 'TPU v5', 95, 459e12, 2765e9, cores_in_type_name=2),
    Chip('v6e', 'TPU v6 lite', 32, 918e12, 1638e9),
)}
COLAB_TYPES = ('v2-8', 'v5e-1', 'v6e-1')  # Colab's TPU runtimes, as Cloud names them.
KAGGLE_TYPES = ('v5e-8',)  # Kaggle's TPU runtime, free within weekly hours.
HEADROOM = 0.1  # A step fits if it leaves this fraction of HBM free (fragmentation, runtime buffers).
# JAX takes this fraction of a GPU's memory for its pool at start (XLA_PYTHON_CLIENT_MEM_FRACTION's
# default): a GPU step fits if it leaves HEADROOM of the pool free, which also covers cuDNN's
# convolution workspaces, which a compile without the GPU does not choose.
JAX_GPU_MEMORY_FRACTION = 0.75
# Deviceless GPU compiles are not autotuned, and Triton's default GEMM tiles fail on some of the
# recipes' dots ("Couldn't find output tile sizes"): the check's dots go to cuBLAS instead.
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}
# The learning-rate schedule's length changes constants in the program, not its size or cost.
_SCHEDULE_STEPS = 1000
GIB = 2 ** 30
_CLASS_NAMES = {**synthetic.CLASS_NAMES, 'all_aria': all_aria.CLASS_NAMES, 'all_idb2': all_idb2.CLASS_NAMES,
                'cnmc2019': cnmc2019.CLASS_NAMES}


def topology_devices(topology: str) -> tuple[Chip, list]:
    """The chip of `topology` ('v5e:2x2') and its devices, from libtpu's description of it."""
    if importlib.util.find_spec('libtpu') is None:
        raise ValueError('libtpu is not installed: it compiles for TPUs on this host. '
                         'pip install -r requirements-test.txt (or jax[tpu])')
    name, _, shape = topology.partition(':')
    try:
        dims = [int(d) for d in shape.split('x')]
    except ValueError:
        dims = []
    if name not in CHIPS or not dims or min(dims) < 1:
        raise ValueError(f"unknown TPU topology {topology!r}: expected '<chip>:<shape>' such as "
                         f"v5e:1x1, v5e:2x2 or v4:2x2x1, with chip one of {', '.join(CHIPS)}")
    chip = CHIPS[name]
    options = {'chip_config_name': chip.chip_config_name}
    if math.prod(dims) == 1:
        options['chips_per_host_bounds'] = (1, 1, 1)  # libtpu's host bounds assume several chips.
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform='tpu', **options).devices
    except jax.errors.JaxRuntimeError as error:  # libtpu's message says what it did not accept.
        raise ValueError(f'libtpu does not know the TPU topology {topology!r}: {error}') from error
    if devices[0].device_kind != chip.device_kind:
        raise ValueError(f'{topology!r} has {devices[0].device_kind!r} devices, not {chip.device_kind!r}')
    return chip, devices


def _abstract(shape, dtype, mesh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


@dataclasses.dataclass(frozen=True)
class Target:
    """What a report needs of a TPU slice or a GPU host: a chip is a TPU chip or one GPU."""
    platform: str  # tpu | gpu
    chip: str
    device_kind: str
    devices: list
    chips: int
    memory_gib: float  # Per chip.
    usable_gib: float  # What a program may take of it: HEADROOM is left free of this.
    peak_flops: float  # Per chip, per second, in the program's compute dtype.
    bytes_per_second: float  # Per chip.
    compiler_options: dict


def target(topology: str, dtype: str) -> Target:
    """The TPU slice ('v5e:2x2') or GPU host ('8xh100') that `topology` names."""
    if ':' in topology:
        chip, devices = topology_devices(topology)
        return Target('tpu', chip.name, chip.device_kind, devices, len({tuple(d.coords) for d in devices}),
                      chip.hbm_gib, chip.hbm_gib, chip.peak_bf16_flops, chip.hbm_bytes_per_second, {})
    gpu, _ = gpu_targets.parse(topology)
    if dtype not in gpu.peak_flops:
        raise ValueError(f'{gpu.name} has no {dtype} arithmetic (it computes {", ".join(gpu.peak_flops)}): '
                         f"add ',{gpu.name}' to the config's arg (:gpu,{gpu.name})")
    gpu, devices = gpu_targets.devices(topology)
    return Target('gpu', gpu.name, gpu.device_kind, devices, len(devices), gpu.memory_gib,
                  gpu.memory_gib * JAX_GPU_MEMORY_FRACTION, gpu.peak_flops[dtype], gpu.memory_bytes_per_second,
                  GPU_COMPILER_OPTIONS)


def _compile(step, args, compiler_options: dict) -> tuple[object, object, float, float]:
    start = time.perf_counter()
    lowered = step.trace(*args).lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    return lowered, compiled, lowered_at - start, time.perf_counter() - lowered_at


_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)')


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape ('(bf16[4,32]{1,0}, u8[0]{0})'); pred is a byte, as XLA stores it."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        bits = {'pred': 8, 'bf16': 16}.get(dtype) or (8 if dtype.startswith('f8') else int(dtype[1:]))
        total += bits // 8 * math.prod(int(d) for d in dims.split(',') if d)
    return total


def _gpu_cost(lowered, compiled, devices: int) -> tuple[float, float]:
    """FLOPs and bytes per device of a program compiled for GPUs, which report no cost analysis.
    FLOPs: XLA's HLO cost analysis (on the CPU client) of the program before GPU optimisation,
    the whole batch's, over the devices; after it, convolutions and dots are cuDNN and cuBLAS
    custom calls that the analysis counts as -1. Bytes: the analysis of the optimised per-device
    program (its fusions, as the GPU runs them), plus what each custom call reads and writes."""
    cpu = jax.devices('cpu')[0].client
    flops = _jax.hlo_module_cost_analysis(cpu, lowered._lowering.hlo().as_hlo_module())['flops'] / devices
    optimised = compiled.runtime_executable().hlo_modules()[0]
    bytes_accessed = _jax.hlo_module_cost_analysis(cpu, optimised)['bytes accessed']
    text = compiled.as_text()
    fused = set(re.findall(r'\bcalls=%([\w.\-]+)', text))  # Fusions' bodies: counted as the fusion.
    shapes, computation = {}, None
    for line in text.splitlines():
        if not line.startswith(' '):  # A computation's header, or its end.
            words = line.split()
            computation = (words[1] if words[:1] == ['ENTRY'] else words[0]).lstrip('%') if words else None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands = match.groups()
        shapes[name] = shape
        if opcode == 'custom-call' and computation not in fused:
            operand_bytes = sum(_shape_bytes(shapes.get(o.strip().split()[-1].lstrip('%'), ''))
                                for o in operands.split(',') if o.strip())
            bytes_accessed += _shape_bytes(shape) + operand_bytes + 1  # The analysis counted it as -1.
    return flops, bytes_accessed


def _report(lowered, compiled, target: Target, per_chip_batch: int, micro_batches: int = 1) -> dict:
    """Per-chip memory, cost and roofline of a program compiled for one device. HBM in use:
    arguments + outputs - aliased (outputs written into donated arguments) + temporaries +
    generated code, as MaxText's train_compile counts it. XLA's cost analysis counts a loop's
    body once: with `micro_batches` (a scan over them, each augmenting its images, running the
    network and adding its gradient), FLOPs and bytes are scaled by their number, which counts
    what runs once per step (the augmentation's draws, the optimiser update) that many times."""
    devices_per_chip = len(target.devices) // target.chips
    memory = compiled.memory_analysis()
    parts = {'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
             'aliased': memory.alias_size_in_bytes,  # Outputs in donated argument buffers.
             'temporaries': memory.temp_size_in_bytes, 'generated_code': memory.generated_code_size_in_bytes}
    per_device = (parts['arguments'] + parts['outputs'] - parts['aliased'] + parts['temporaries']
                   + parts['generated_code'])
    hbm = {key: value * devices_per_chip / GIB for key, value in parts.items()}
    hbm['total'] = per_device * devices_per_chip / GIB
    if target.platform == 'gpu':
        flops, bytes_accessed = _gpu_cost(lowered, compiled, len(target.devices))
    else:
        cost = compiled.cost_analysis()  # Per device. Its 'optimal_seconds' can be negative: unused.
        flops, bytes_accessed = cost['flops'], cost['bytes accessed']
    flops *= devices_per_chip * micro_batches
    bytes_accessed *= devices_per_chip * micro_batches
    compute_s, memory_s = flops / target.peak_flops, bytes_accessed / target.bytes_per_second
    report = {
        'hbm_per_chip_gib': hbm,
        'hbm_capacity_gib': target.memory_gib,
        'hbm_fraction': hbm['total'] / target.memory_gib,
        'fits': hbm['total'] <= (1 - HEADROOM) * target.usable_gib,
        'flops_per_chip': flops,
        'flops_per_image': flops / per_chip_batch,
        'bytes_accessed_per_chip': bytes_accessed,
        'roofline': {'step_seconds': max(compute_s, memory_s),
                     'bound': 'compute' if compute_s >= memory_s else 'memory',
                     'images_per_second_per_chip': per_chip_batch / max(compute_s, memory_s)},
    }
    if target.platform == 'gpu':
        report['usable_gib'] = target.usable_gib
    return report


def check(config: ml_collections.ConfigDict, topology: str, steps=('train', 'eval'),
          num_classes: int | None = None) -> dict:
    """Compiles `steps` of `config` for `topology`; returns the report (see the module docstring).
    `num_classes` defaults to that of the config's data set, where known without reading it."""
    unknown = set(steps) - {'train', 'eval'}
    if unknown or not steps:
        raise ValueError(f'steps must be train and/or eval, not {",".join(steps)}')
    found = target(topology, config.dtype)
    mesh = sharding.make_mesh(found.devices)
    global_batch, size = config.batch_size, config.data.image_size
    sharding.check_batch_size(global_batch, mesh)
    per_chip_batch = global_batch // found.chips
    if num_classes is None:
        if config.data.name not in _CLASS_NAMES:
            raise ValueError(f'the classes of data.name={config.data.name!r} are in its files: pass --num_classes')
        num_classes = len(_CLASS_NAMES[config.data.name])
    built = loop.build(config, num_classes, _SCHEDULE_STEPS, mesh, load_pretrained=False, abstract=True)
    images = _abstract((global_batch, size, size, 3), jnp.uint8, mesh)
    result = {
        'platform': found.platform,
        'model': config.model.name, 'dtype': config.dtype, 'image_size': size, 'num_classes': num_classes,
        'topology': topology, 'chip': found.chip, 'device_kind': found.device_kind, 'chips': found.chips,
        'devices': len(found.devices), 'global_batch': global_batch, 'per_chip_batch': per_chip_batch,
        'chip_spec': {'hbm_gib': found.memory_gib, 'hbm_gb_per_second': found.bytes_per_second / 1e9,
                      **({'peak_bf16_tflops': found.peak_flops / 1e12} if found.platform == 'tpu' else
                         {'peak_tflops': found.peak_flops / 1e12, 'jax_memory_fraction': JAX_GPU_MEMORY_FRACTION})},
        'compiler_options': found.compiler_options,
    }
    for name in steps:
        micro_batches = 1
        if name == 'train':
            step = loop.make_train_step(config, built, mesh)
            args = (built.state, {'image': images, 'label': _abstract((global_batch,), jnp.int32, mesh)})
            micro_batches = loop.accumulation_steps(config, len(found.devices))
        else:
            step, args = loop.make_eval_step(config, built, mesh), (built.state, images)
        lowered, compiled, lower_s, compile_s = _compile(step, args, found.compiler_options)
        result[name] = {'trace_and_lower_seconds': lower_s, 'compile_seconds': compile_s,
                        'micro_batches': micro_batches,
                        **_report(lowered, compiled, found, per_chip_batch, micro_batches)}
    return result


def accelerator_type(chip: str, chips: int) -> str:
    """Cloud's name for `chips` chips of `chip`: v2:2x2 (4 chips) is a v2-8, v5e:2x4 a v5e-8."""
    return f'{chip}-{chips * CHIPS[chip].cores_in_type_name}'


def table(reports: list[dict]) -> str:
    """The README's table (markdown) of the reports, all of TPUs or all of GPUs."""
    platforms = {report.get('platform', 'tpu') for report in reports}  # Reports before GPUs are TPUs'.
    if platforms == {'gpu'}:
        return gpu_table(reports)
    if platforms != {'tpu'}:
        raise ValueError('reports of TPUs and of GPUs make two tables: keep them in two folders')
    return tpu_table(reports)


def tpu_table(reports: list[dict]) -> str:
    """One row per recipe and topology, recipes by name, Colab's TPUs first, then by chip count."""
    def order(report):
        name = accelerator_type(report['chip'], report['chips'])
        colab = COLAB_TYPES.index(name) if name in COLAB_TYPES else len(COLAB_TYPES)
        return report['model'], colab, report['chips'], name

    def runtime(name):
        return f'{name} (Colab)' if name in COLAB_TYPES else f'{name} (Kaggle, free)' if name in KAGGLE_TYPES else name

    lines = ['| recipe `:tpu` | TPU | chips | images per chip per step | train GiB per chip / HBM '
             '| fits (≥ 10 % free) | train GFLOP per image | roofline train images/s per chip |',
             '|---|---|---|---|---|---|---|---|']
    for report in sorted(reports, key=order):
        train = report['train']
        name = accelerator_type(report['chip'], report['chips'])
        micro = train.get('micro_batches', 1)
        per_chip = report['per_chip_batch']
        images = f'{per_chip} ({micro} × {per_chip // micro})' if micro > 1 else f'{per_chip}'
        roofline = train['roofline']
        lines.append(' | '.join([
            f'| {report["model"]}', runtime(name), str(report['chips']), images,
            f'{train["hbm_per_chip_gib"]["total"]:.1f} / {train["hbm_capacity_gib"]:g}',
            'yes' if train['fits'] else '**no**', f'{train["flops_per_image"] / 1e9:.0f}',
            f'{roofline["images_per_second_per_chip"]:.0f} ({roofline["bound"]}) |']))
    return '\n'.join(lines)


def gpu_table(reports: list[dict]) -> str:
    """One row per recipe and GPU host, recipes by name, then by GPU count and in the order of
    `gpu_targets.GPUS`; Colab's and Kaggle's runtimes named (`gpu_targets.RUNTIMES`)."""
    def order(report):
        return report['model'], report['chips'], list(gpu_targets.GPUS).index(report['chip'])

    lines = ['| recipe | GPU | GPUs | compute | images per GPU per step | train GiB per GPU / memory '
             '| fits (≥ 10 % of JAX\'s 75 % free) | train GFLOP per image | roofline train images/s per GPU |',
             '|---|---|---|---|---|---|---|---|---|']
    for report in sorted(reports, key=order):
        train = report['train']
        micro, per_gpu = train['micro_batches'], report['per_chip_batch']
        roofline = train['roofline']
        runtime = gpu_targets.RUNTIMES.get(report['topology'])
        gpu = report['chip'] + (f' ({runtime})' if runtime else '')
        lines.append(' | '.join([
            f'| {report["model"]} `{report["config"].rpartition(":")[2]}`', gpu, str(report['chips']),
            report['dtype'], f'{per_gpu} ({micro} × {per_gpu // micro})' if micro > 1 else f'{per_gpu}',
            f'{train["hbm_per_chip_gib"]["total"]:.1f} / {train["hbm_capacity_gib"]:.1f}',
            'yes' if train['fits'] else '**no**', f'{train["flops_per_image"] / 1e9:.0f}',
            f'{roofline["images_per_second_per_chip"]:.0f} ({roofline["bound"]}) |']))
    return '\n'.join(lines)


def read_reports(directory: str) -> list[dict]:
    """Every report (*.json) in `directory`; a file that is not one is named in the error."""
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith('.json'))
    except OSError as error:
        raise ValueError(f'cannot list aot_check (tpu_check) reports in {directory}: {error.strerror}') from error
    if not names:
        raise ValueError(f'no aot_check reports (*.json) in {directory}')
    reports = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                report = json.load(f)
            report['train']['roofline']
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f'{path} is not an aot_check (tpu_check) report with a train step '
                             f'({type(error).__name__}: {error}); rerun the check that wrote it') from error
        reports.append(report)
    return reports


def define_flags():
    """Run as a program only: main.py, which tests import too, defines --config as well."""
    config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/efficientnetv2_b3_se.py:tpu.',
                                    lock_config=True)
    flags.DEFINE_string('topology', None, "TPU topology '<chip>:<shape>' (v5e:1x1, v5e:2x2, v4:2x2x1, v2:2x2) or "
                        f"GPU host '[<count>x]<gpu>' (t4, 8xh100), gpu one of {', '.join(gpu_targets.GPUS)}.")
    flags.DEFINE_list('steps', ['train', 'eval'], 'The steps to compile: train, eval or both.')
    flags.DEFINE_integer('num_classes', None, "Default: the number of classes of the config's data set.")
    flags.DEFINE_string('output', None, 'Also write the JSON report here (e.g. benchmarks/gpu_check/<name>.json).')
    flags.DEFINE_string('table', None, "Instead of compiling: print the README's table of the reports in this folder.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if FLAGS.table:
        try:
            print(table(read_reports(FLAGS.table)))
        except ValueError as error:  # read_reports names the folder or file it could not use.
            raise app.UsageError(str(error)) from error
        return
    if FLAGS.config is None or FLAGS.topology is None:
        raise app.UsageError('--config and --topology are required (or --table)')
    runtime.quiet_library_logs()
    try:
        result = check(FLAGS.config, FLAGS.topology, FLAGS.steps, FLAGS.num_classes)
    except ValueError as error:  # A topology, batch size or data set this check cannot take.
        raise app.UsageError(str(error)) from error
    result = {'config': config_flags.get_config_filename(FLAGS['config']),
              'overrides': config_flags.get_override_values(FLAGS['config']), **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or '.', exist_ok=True)
        with files.atomic_open(FLAGS.output) as f:
            f.write(text + '\n')


def run():
    define_flags()
    app.run(main)


if __name__ == '__main__':
    run()
