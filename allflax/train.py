"""train_and_evaluate(config, workdir): the training loop, resumable, ending in a test evaluation."""
import json
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from allflax import checkpoints, evaluate, platform, sharding, steps, summary_writer
from allflax.data import pipeline


class _MetricsLog:
    """Appends each record to metrics.jsonl and to TensorBoard, from the first process only."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, 'metrics.jsonl')
        self._tensorboard = summary_writer.SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, record: dict):
        if jax.process_index() == 0:
            with open(self._path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        self._tensorboard.write(record)

    def close(self):
        self._tensorboard.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`) and returns the test metrics."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config.to_json_best_effort(indent=1))
    mesh = sharding.make_mesh()
    local_batch_size = sharding.check_batch_size(config.batch_size, mesh)
    dataset = pipeline.load(config, workdir)
    total_steps = steps.total_train_steps(config, len(dataset.splits['train']))
    built = steps.setup(config, len(dataset.class_names), total_steps, mesh)
    train_step = steps.make_train_step(built.parts, built.tx, built.schedule, config, mesh,
                                       built.state_sharding)
    eval_step = steps.make_eval_step(built.parts, config, mesh, built.state_sharding)

    train_iterator = iter(pipeline.train_dataset(
        dataset.splits['train'], local_batch_size=local_batch_size, seed=config.seed,
        num_workers=config.data.num_workers))
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                            keep=config.keep_checkpoints)
    state = built.state
    start_step = checkpointer.latest_step() or 0
    if start_step:
        abstract = checkpoints.abstract_with_sharding(state, built.state_sharding)
        state, data_state = checkpointer.restore(start_step, abstract)
        try:
            train_iterator.set_state(data_state)
        except (KeyError, ValueError) as error:
            raise ValueError(f'the input position saved at step {start_step} does not fit this input '
                             f'pipeline ({error!r}): resume with the data settings the run started with '
                             f'(data.num_workers included)') from error
        logging.info('Resumed from step %d in %s', start_step, checkpointer.directory)
    batches = pipeline.DevicePrefetcher(train_iterator, sharding.batch_sharding(mesh))

    metrics_log = _MetricsLog(workdir)
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                         disable=jax.process_index() != 0)
    pending = []  # Device-side metrics since the last log: fetched only when logging.
    last_log_step, last_log_time = start_step, time.perf_counter()
    # A full garbage collection of the setup objects would stall a step every ~14 (platform.py).
    with platform.setup_objects_frozen():
        try:
            for step in range(start_step + 1, total_steps + 1):
                state, step_metrics = train_step(state, next(batches))
                pending.append(step_metrics)
                if step % config.log_every_steps == 0 or step == total_steps:
                    host = jax.device_get(pending)
                    now = time.perf_counter()
                    record = {'step': step,
                              'train_loss': float(np.mean([m['loss'] for m in host])),
                              'train_accuracy': float(np.mean([m['accuracy'] for m in host])),
                              'learning_rate': float(host[-1]['learning_rate']),
                              'images_per_sec': (step - last_log_step) * config.batch_size / (now - last_log_time)}
                    metrics_log.write(record)
                    progress.update(step - progress.n)
                    progress.set_postfix(loss=f"{record['train_loss']:.4f}",
                                         img_s=f"{record['images_per_sec']:.1f}")
                    pending, last_log_step = [], step
                validation = None
                if step % config.eval_every_steps == 0 or step == total_steps:
                    validation = evaluate.evaluate_split(eval_step, state, dataset, 'val',
                                                         config.batch_size, mesh)
                    val_record = {'step': step, 'val_accuracy': validation['accuracy'],
                                  'val_f1_macro': validation['f1_macro'], 'val_nll': validation['nll']}
                    metrics_log.write(val_record)
                    logging.info('step %d: validation accuracy %.4f', step, validation['accuracy'])
                if validation or step % config.checkpoint_every_steps == 0:
                    checkpointer.save(step, state, batches.consumed_state,
                                      metrics={'accuracy': validation['accuracy']} if validation else None)
                if step % config.log_every_steps == 0:
                    # Evaluation and checkpoint time are not training throughput.
                    last_log_time = time.perf_counter()
        finally:
            progress.close()
            checkpointer.wait_until_finished()
            checkpointer.close()
            metrics_log.close()
            train_iterator.close()  # Stops Grain's worker processes and frees their shared memory.

    # The same metrics.json and predictions.csv as --mode=eval, without its report (plots, Grad-CAM).
    test, _ = evaluate.evaluate_state(eval_step, state, dataset, 'test', config, mesh, workdir, total_steps)
    logging.info('Test accuracy %.4f (step %d), written to %s', test['accuracy'], total_steps,
                 os.path.join(workdir, 'eval', 'test'))
    return test
