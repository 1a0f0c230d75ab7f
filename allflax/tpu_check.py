"""Will a recipe fit a TPU, and how fast could it go? Compiles its train and eval steps for a TPU
topology on this CPU host, ahead of time (libtpu, no TPU), and reports per-chip HBM use against
the chip's capacity, FLOPs per image and a roofline bound on images/s.

  python -m allflax.tpu_check --config=configs/efficientnetv2_b3_se.py:tpu --topology=v5e:1x1 \
      [--steps=train,eval] [--output=benchmarks/tpu_check/b3_v5e.json]
  python -m allflax.tpu_check --table=benchmarks/tpu_check    # The README's table of those JSONs.

The programs are the ones training runs (`train.make_train_step`, `train.make_eval_step`) over a
mesh of the topology's devices, with the recipe's global batch split over them.
"""
import dataclasses
import importlib.util
import json
import math
import os
import time

# Before JAX is imported: with libtpu installed, JAX would otherwise look for a local TPU first
# (and take /tmp/libtpu_lockfile, failing any other process that loads libtpu). This host only
# compiles for the topology, on its CPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from allflax import files, runtime, sharding, train  # noqa: E402
from allflax.data.sources import all_aria, all_idb2, cnmc2019, synthetic  # noqa: E402

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
HEADROOM = 0.1  # A step fits if it leaves this fraction of HBM free (fragmentation, runtime buffers).
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


def _compile(step, *args) -> tuple[object, float, float]:
    start = time.perf_counter()
    lowered = step.trace(*args).lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _report(compiled, chip: Chip, devices_per_chip: int, per_chip_batch: int, micro_batches: int = 1) -> dict:
    """Per-chip memory, cost and roofline of a program compiled for one device. HBM in use:
    arguments + outputs - aliased (outputs written into donated arguments) + temporaries +
    generated code, as MaxText's train_compile counts it. XLA's cost analysis counts a loop's
    body once: with `micro_batches` (a scan over them, each augmenting its images, running the
    network and adding its gradient), FLOPs and bytes are scaled by their number, which counts
    what runs once per step (the augmentation's draws, the optimiser update) that many times."""
    memory = compiled.memory_analysis()
    parts = {'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
             'aliased': memory.alias_size_in_bytes,  # Outputs in donated argument buffers.
             'temporaries': memory.temp_size_in_bytes, 'generated_code': memory.generated_code_size_in_bytes}
    per_device = (parts['arguments'] + parts['outputs'] - parts['aliased'] + parts['temporaries']
                   + parts['generated_code'])
    hbm = {key: value * devices_per_chip / GIB for key, value in parts.items()}
    hbm['total'] = per_device * devices_per_chip / GIB
    cost = compiled.cost_analysis()  # Per device. Its 'optimal_seconds' can be negative: unused.
    flops = cost['flops'] * devices_per_chip * micro_batches
    bytes_accessed = cost['bytes accessed'] * devices_per_chip * micro_batches
    compute_s, memory_s = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_second
    return {
        'hbm_per_chip_gib': hbm,
        'hbm_capacity_gib': chip.hbm_gib,
        'hbm_fraction': hbm['total'] / chip.hbm_gib,
        'fits': hbm['total'] <= (1 - HEADROOM) * chip.hbm_gib,
        'flops_per_chip': flops,
        'flops_per_image': flops / per_chip_batch,
        'bytes_accessed_per_chip': bytes_accessed,
        'roofline': {'step_seconds': max(compute_s, memory_s),
                     'bound': 'compute' if compute_s >= memory_s else 'memory',
                     'images_per_second_per_chip': per_chip_batch / max(compute_s, memory_s)},
    }


def check(config: ml_collections.ConfigDict, topology: str, steps=('train', 'eval'),
          num_classes: int | None = None) -> dict:
    """Compiles `steps` of `config` for `topology`; returns the report (see the module docstring).
    `num_classes` defaults to that of the config's data set, where known without reading it."""
    unknown = set(steps) - {'train', 'eval'}
    if unknown or not steps:
        raise ValueError(f'steps must be train and/or eval, not {",".join(steps)}')
    chip, devices = topology_devices(topology)
    chips = len({tuple(d.coords) for d in devices})
    devices_per_chip = len(devices) // chips
    mesh = sharding.make_mesh(devices)
    global_batch, size = config.batch_size, config.data.image_size
    sharding.check_batch_size(global_batch, mesh)
    per_chip_batch = global_batch // chips
    if num_classes is None:
        if config.data.name not in _CLASS_NAMES:
            raise ValueError(f'the classes of data.name={config.data.name!r} are in its files: pass --num_classes')
        num_classes = len(_CLASS_NAMES[config.data.name])
    built = train.build(config, num_classes, _SCHEDULE_STEPS, mesh, load_pretrained=False, abstract=True)
    images = _abstract((global_batch, size, size, 3), jnp.uint8, mesh)
    result = {
        'model': config.model.name, 'dtype': config.dtype, 'image_size': size, 'num_classes': num_classes,
        'topology': topology, 'chip': chip.name, 'device_kind': chip.device_kind, 'chips': chips,
        'devices': len(devices), 'global_batch': global_batch, 'per_chip_batch': per_chip_batch,
        'chip_spec': {'hbm_gib': chip.hbm_gib, 'peak_bf16_tflops': chip.peak_bf16_flops / 1e12,
                      'hbm_gb_per_second': chip.hbm_bytes_per_second / 1e9},
    }
    for name in steps:
        micro_batches = 1
        if name == 'train':
            step = train.make_train_step(config, built, mesh)
            args = (built.state, {'image': images, 'label': _abstract((global_batch,), jnp.int32, mesh)})
            micro_batches = train.accumulation_steps(config, len(devices))
        else:
            step, args = train.make_eval_step(config, built, mesh), (built.state, images)
        compiled, lower_s, compile_s = _compile(step, *args)
        result[name] = {'trace_and_lower_seconds': lower_s, 'compile_seconds': compile_s,
                        'micro_batches': micro_batches,
                        **_report(compiled, chip, devices_per_chip, per_chip_batch, micro_batches)}
    return result


def accelerator_type(chip: str, chips: int) -> str:
    """Cloud's name for `chips` chips of `chip`: v2:2x2 (4 chips) is a v2-8, v5e:2x4 a v5e-8."""
    return f'{chip}-{chips * CHIPS[chip].cores_in_type_name}'


def table(reports: list[dict]) -> str:
    """The README's table (markdown) of tpu_check reports: one row per recipe and topology,
    recipes by name, Colab's TPUs first, then by chip count."""
    def order(report):
        name = accelerator_type(report['chip'], report['chips'])
        colab = COLAB_TYPES.index(name) if name in COLAB_TYPES else len(COLAB_TYPES)
        return report['model'], colab, report['chips'], name

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
            f'| {report["model"]}', f'{name} (Colab)' if name in COLAB_TYPES else name, str(report['chips']), images,
            f'{train["hbm_per_chip_gib"]["total"]:.1f} / {train["hbm_capacity_gib"]:g}',
            'yes' if train['fits'] else '**no**', f'{train["flops_per_image"] / 1e9:.0f}',
            f'{roofline["images_per_second_per_chip"]:.0f} ({roofline["bound"]}) |']))
    return '\n'.join(lines)


def read_reports(directory: str) -> list[dict]:
    """Every report (*.json) in `directory`; a file that is not one is named in the error."""
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith('.json'))
    except OSError as error:
        raise ValueError(f'cannot list tpu_check reports in {directory}: {error.strerror}') from error
    if not names:
        raise ValueError(f'no tpu_check reports (*.json) in {directory}')
    reports = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                report = json.load(f)
            report['train']['roofline']
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f'{path} is not a tpu_check report with a train step '
                             f'({type(error).__name__}: {error}); rerun the check that wrote it') from error
        reports.append(report)
    return reports


def define_flags():
    """Run as a program only: main.py, which tests import too, defines --config as well."""
    config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/efficientnetv2_b3_se.py:tpu.',
                                    lock_config=True)
    flags.DEFINE_string('topology', None, "TPU topology '<chip>:<shape>', e.g. v5e:1x1, v5e:2x2, v4:2x2x1, v2:2x2.")
    flags.DEFINE_list('steps', ['train', 'eval'], 'The steps to compile: train, eval or both.')
    flags.DEFINE_integer('num_classes', None, "Default: the number of classes of the config's data set.")
    flags.DEFINE_string('output', None, 'Also write the JSON report here (e.g. benchmarks/tpu_check/<name>.json).')
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


if __name__ == '__main__':
    define_flags()
    app.run(main)
