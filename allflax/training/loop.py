"""train_and_evaluate(config, workdir): the training loop, resumable, ending in a test evaluation,
for --mode=train and --mode=montecarlo; and what tools build as training does (the model and state,
the compiled steps).

A run owns its workdir (a lock), resumes only the run it started (its config.json), saves a
checkpoint and stops at SIGTERM or SIGINT (a second one aborts), and stops at a non-finite loss or
gradient instead of training on, or saving, a diverged state.
"""
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from allflax import files, models, runtime, sharding
from allflax.cpu import conv as cpu_conv
from allflax.data import augment, input_convention, pipeline, sources
from allflax.data.dataset import default_cache_dir, read_splits_json
from allflax.evaluation import inference, results
from allflax.models import imagenet
from allflax.training import checkpoints, config_check, resume_check, state, steps, summary_writer, workdir_lock
from configs import common


def build(config: ml_collections.ConfigDict, num_classes: int, total_steps: int, mesh, *,
          load_pretrained: bool = True, abstract: bool = False) -> state.Setup:
    """The model, optimiser and initial state of `config` (`state.setup` with its sections)."""
    if jax.numpy.dtype(config.dtype) == jax.numpy.bfloat16 and not abstract and jax.default_backend() == 'cpu' and \
            cpu_conv.bfloat16_computes_in_float32():
        logging.warning('dtype=bfloat16 on a CPU without bfloat16 arithmetic: convolutions compute in float32 and the '
                        'step is no faster than float32 (use --config.dtype=float32 here; bfloat16 pays on CPUs '
                        'with AVX-512, GPUs and TPUs)')
    return state.setup(config.model, config.optimizer, mesh, num_classes=num_classes,
                       image_size=config.data.image_size, dtype=config.dtype, seed=config.seed,
                       total_steps=total_steps, cache_dir=default_cache_dir(config), load_pretrained=load_pretrained,
                       abstract=abstract)


def resolve_input_convention(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills `config.data.input_convention` in place, where it is '', with that of the weights
    `model.init_from` names (imagenet.input_convention_of_run, which also refuses a value that
    contradicts them), and returns `config`. A config without the key (a run that predates it) is
    left as it is."""
    if 'input_convention' in config.data:
        config.data.input_convention = imagenet.input_convention_of_run(
            config.model.init_from, config.model.name, config.data.input_convention)
    return config


def make_train_step(config: ml_collections.ConfigDict, built: state.Setup, mesh):
    resolve_input_convention(config)
    return steps.make_train_step(built, mesh, data=config.data, loss=config.loss, dtype=config.dtype,
                                 seed=config.seed, accumulation_steps=accumulation_steps(config, mesh.size))


def make_eval_step(config: ml_collections.ConfigDict, built: state.Setup, mesh):
    resolve_input_convention(config)
    return steps.make_inference_step(steps.logits, built, mesh, data=config.data, dtype=config.dtype)


def total_steps_of(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    return state.total_train_steps(total_steps=config.total_steps, num_epochs=config.num_epochs,
                                   batch_size=config.batch_size, num_train_examples=num_train_examples)


def accumulation_steps(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Micro-batches per step: the fewest that keep each device's share of `batch_size` within
    `max_device_batch` (0: no limit) and divide it evenly."""
    per_device = config.batch_size // num_devices
    limit = config.get('max_device_batch', 0)
    if not limit or per_device <= limit:
        return 1
    return next(k for k in range(-(-per_device // limit), per_device + 1) if per_device % k == 0)


def derived_batches(config: ml_collections.ConfigDict, num_devices: int, batch_norm: bool) -> dict:
    """What the devices made of `batch_size`, for config.json's `derived` section (of this start of
    the run; not settings): images per device, micro-batches per step, and the images whose
    statistics batch norm takes (None without batch norm): one micro-batch's, over all devices
    (the jitted step computes them over the whole sharded micro-batch), so batch_size / micro-batches."""
    micro_batches = accumulation_steps(config, num_devices)
    return {'devices': num_devices, 'device_batch': config.batch_size // num_devices, 'micro_batches': micro_batches,
            'batch_norm_batch': config.batch_size // micro_batches if batch_norm else None}


class Interrupted(RuntimeError):
    """Training stopped at a signal after saving a checkpoint: rerunning the command resumes it.
    `exit_code` is the signal's, as a shell reports a process it ended (128 + its number)."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name].value


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stopped before saving that state."""


def validate(config: ml_collections.ConfigDict):
    """Rejects config values that cannot train (config_check.validate_config), naming each one."""
    config_check.validate_config(config, synthetic_names=sources.synthetic.CLASS_NAMES, real_names=sources.REAL,
                              model_names=models.names(), augment_names=augment.AUGMENTATIONS)


def check_resume(config: ml_collections.ConfigDict, workdir: str):
    """Refuses a folder that is not a run's, and a config that differs from `workdir/config.json`
    in what changes the result; logs the allowed differences. Runs before any file of the workdir
    is written."""
    saved = resume_check.saved_run_config(workdir)
    if saved is None:
        return
    saved.pop('derived', None)  # Derived from the settings and the devices of its start, not a setting.
    defaults = common.base_config(model=config.model.name, data=config.data.name, image_size=config.data.image_size,
                                  batch_size=config.batch_size, num_epochs=config.num_epochs,
                                  learning_rate=config.optimizer.learning_rate).to_dict()
    defaults['data']['input_convention'] = input_convention.PREDATING  # Of every run before the setting.
    for line in resume_check.check_resume(saved, json.loads(config.to_json_best_effort()), workdir=workdir,
                                       defaults=defaults):
        logging.info('Resuming %s with a changed setting: %s', workdir, line)


@contextlib.contextmanager
def _stop_requests():
    """Within it, the first SIGTERM or SIGINT sets `requested['signal']` for the loop to stop at the
    end of its step; a second one aborts at once. In a multi-process run JAX's preemption service
    takes SIGTERM instead, and the loop asks it for the step at which every process stops."""
    requested = {'signal': None}
    previous = {}

    def handle(signum, frame):
        if requested['signal'] is not None:
            for number, handler in previous.items():
                signal.signal(number, handler)
            raise KeyboardInterrupt(f'second {signal.Signals(signum).name}: aborted without a checkpoint')
        requested['signal'] = signal.Signals(signum).name

    for number in (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,):
        previous[number] = signal.signal(number, handle)
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`) and returns the test metrics."""
    validate(config)
    resolve_input_convention(config)  # Before check_resume: config.json holds the resolved value.
    check_resume(config, workdir)
    if config.model.init_from == 'imagenet':
        # Fetched before the workdir is written: offline, the run stops here saying how to get them.
        imagenet.imagenet_params(config.model.name, default_cache_dir(config))
    lock = workdir_lock.WorkdirLock(workdir) if files.is_writer() else None
    with lock or contextlib.nullcontext():
        return _train_and_evaluate(config, workdir, writer_check(lock, workdir))


def writer_check(lock: workdir_lock.WorkdirLock | None, workdir: str) -> Callable[[], None]:
    """A check that every process calls before each write of the workdir, at the same point of the
    run: it raises WorkdirBusyError on every process once process 0, which holds `lock`, has lost
    it (taken over, a renewal failed), so that all stop together and none waits in a collective."""
    def check():
        reason = ''
        if lock is not None:
            try:
                lock.check()
            except workdir_lock.WorkdirBusyError as error:
                reason = str(error)
        if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(bool(reason))) and not reason:
            reason = (f'process 0 lost the lock of {workdir}: every process stops with it, before writing '
                      f'(process 0\'s log says why)')
        if reason:
            raise workdir_lock.WorkdirBusyError(reason)
    return check


def load_data(config: ml_collections.ConfigDict, workdir: str):
    """The run's data: a resumed run's exactly as its splits.json records them (refused in one line
    where data.dir no longer holds them); a new run's split now and recorded in splits.json."""
    recorded = read_splits_json(workdir) if os.path.exists(os.path.join(workdir, 'config.json')) else None
    if recorded is None:
        return pipeline.load(config, workdir)
    return pipeline.load(config, recorded=recorded, run=workdir, action='resume')


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, check_writer: Callable[[], None]) -> dict:
    mesh = sharding.make_mesh()
    local_batch_size = sharding.check_batch_size(config.batch_size, mesh)
    dataset = load_data(config, workdir)  # Before config.json: a refused resume changes no file.
    if files.is_writer():
        with files.atomic_open(os.path.join(workdir, 'config.json')) as f:
            f.write(config.to_json_best_effort(indent=1))
    total_steps = total_steps_of(config, len(dataset.splits['train']))
    built = build(config, len(dataset.class_names), total_steps, mesh)
    if files.is_writer():
        with files.atomic_open(os.path.join(workdir, 'config.json')) as f:
            json.dump({**json.loads(config.to_json_best_effort()),
                       'derived': derived_batches(config, mesh.size, bool(jax.tree.leaves(built.state.batch_stats)))},
                      f, indent=1)
    train_step = make_train_step(config, built, mesh)
    eval_step = make_eval_step(config, built, mesh)

    train_iterator = iter(pipeline.train_dataset(
        dataset.splits['train'], local_batch_size=local_batch_size, seed=config.seed,
        num_workers=config.data.num_workers))
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                            keep=config.keep_checkpoints)
    abstract = checkpoints.abstract_with_sharding(built.state, built.state_sharding)
    start_step, restored = checkpointer.restore_newest_readable(lambda step: checkpointer.restore(step, abstract),
                                                                set_aside=True)
    start_step = start_step or 0
    train_state = built.state
    if start_step:
        train_state, data_state = restored
        try:
            train_iterator.set_state(data_state)
        except (KeyError, ValueError) as error:
            raise ValueError(f'the input position saved at step {start_step} does not fit this input '
                             f'pipeline ({error!r}): resume with the data settings the run started with '
                             f'(data.num_workers included)') from error
        logging.info('Resumed from step %d in %s', start_step, checkpointer.directory)
    batches = pipeline.DevicePrefetcher(train_iterator, sharding.batch_sharding(mesh))

    metrics_log = summary_writer.MetricsLog(workdir)
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                         disable=not files.is_writer())
    pending = []  # Device-side metrics since the last log: fetched only when logging.
    last_log_step, last_log_time = start_step, time.perf_counter()
    last_saved = start_step
    # A full garbage collection of the setup objects would stall a step every ~14 (runtime.py).
    with runtime.setup_objects_frozen(), _stop_requests() as stop:
        try:
            for step in range(start_step + 1, total_steps + 1):
                train_state, step_metrics = train_step(train_state, next(batches))
                pending.append(step_metrics)
                if jax.process_count() > 1 and not stop['signal'] and \
                        multihost_utils.reached_preemption_sync_point(step):
                    stop['signal'] = 'SIGTERM'  # On some process: all stop at this step.
                logging_now = step % config.log_every_steps == 0 or step == total_steps
                saving = step % config.eval_every_steps == 0 or step % config.checkpoint_every_steps == 0
                if stop['signal'] or saving or logging_now:
                    # Before anything of a non-finite step is logged or saved, the run stops.
                    host = jax.device_get(pending)
                    _check_finite([m['finite'] for m in host], step + 1 - len(host), last_saved,
                                  checkpointer.directory, scaled='loss_scale' in host[-1])
                if logging_now:
                    checkpointer.check_for_errors()  # A failed background save stops the run here.
                    check_writer()
                    now = time.perf_counter()
                    record = {'step': step,
                              'train_loss': float(np.mean([m['loss'] for m in host])),
                              'train_accuracy': float(np.mean([m['accuracy'] for m in host])),
                              'learning_rate': float(host[-1]['learning_rate']),
                              'images_per_sec': (step - last_log_step) * config.batch_size / (now - last_log_time)}
                    if 'loss_scale' in host[-1]:  # float16: the scale after this step, the steps skipped so far.
                        record['train_loss_scale'] = float(host[-1]['loss_scale'])
                        record['train_skipped_steps'] = int(host[-1]['skipped_steps'])
                    metrics_log.write(record)
                    progress.update(step - progress.n)
                    progress.set_postfix(loss=f"{record['train_loss']:.4f}",
                                         img_s=f"{record['images_per_sec']:.1f}")
                    pending, last_log_step = [], step
                validation = None
                if step % config.eval_every_steps == 0 or step == total_steps:
                    validation = inference.evaluate_split(eval_step, train_state, dataset, 'val',
                                                          config.batch_size, mesh)
                    val_record = {'step': step, 'val_accuracy': validation['accuracy'],
                                  'val_f1_macro': validation['f1_macro'], 'val_nll': validation['nll']}
                    check_writer()
                    metrics_log.write(val_record)
                    logging.info('step %d: validation accuracy %.4f', step, validation['accuracy'])
                if validation or step % config.checkpoint_every_steps == 0 or stop['signal']:
                    check_writer()
                    checkpointer.save(step, train_state, batches.consumed_state,
                                      metrics={'accuracy': validation['accuracy']} if validation else None)
                    last_saved = step
                if stop['signal']:
                    checkpointer.wait_until_finished()
                    raise Interrupted(stop['signal'], f'{stop["signal"]} at step {step}: saved a checkpoint of step '
                                      f'{step} in {checkpointer.directory}; rerun the same command to resume')
                if step % config.log_every_steps == 0:
                    # Evaluation and checkpoint time are not training throughput.
                    last_log_time = time.perf_counter()
        except BaseException:
            # The error on its way up says what went wrong; a failed save would only fail again here.
            with contextlib.suppress(Exception):
                checkpointer.wait_until_finished()
                checkpointer.close()
            raise
        else:
            checkpointer.wait_until_finished()
            checkpointer.close()
        finally:
            progress.close()
            metrics_log.close()
            train_iterator.close()  # Stops Grain's worker processes and frees their shared memory.

    # The same metrics.json and predictions.csv as --mode=eval, without its report (plots, Grad-CAM).
    test, _ = results.evaluate_state(eval_step, train_state, dataset, 'test', mesh, workdir, options=config.eval,
                                     batch_size=config.batch_size, seed=config.seed, split_method=config.data.split,
                                     checkpoint_step=total_steps, input_convention=input_convention.of(config.data).name,
                                     before_write=check_writer)
    logging.info('Test accuracy %.4f (step %d), written to %s', test['accuracy'], total_steps,
                 os.path.join(workdir, 'eval', 'test'))
    return test


def _check_finite(finite_flags, first_step: int, last_saved: int, directory: str, scaled: bool = False):
    """Raises Diverged naming the first step whose loss or gradient norm was not finite (with loss
    scaling: whose loss was not, or whose gradients overflowed float16 at a scale of 1 or below)."""
    bad = [first_step + i for i, finite in enumerate(finite_flags) if not finite]
    if bad:
        saved = f'the last checkpoint is step {last_saved} in {directory}' if last_saved else 'no checkpoint was saved'
        what = ('non-finite loss, or gradients beyond float16\'s range at a loss scale of 1 or below,' if scaled
                else 'non-finite loss or gradient norm')
        advice = (' Lower --config.optimizer.learning_rate, check the data, or train in float32 or bfloat16 '
                  '(--config.dtype).' if scaled else ' Lower --config.optimizer.learning_rate or check the data.')
        raise Diverged(f'{what} at step {bad[0]} ({len(bad)} of the last {len(finite_flags)} steps); the run '
                       f'stopped without saving that state ({saved}).{advice}')
