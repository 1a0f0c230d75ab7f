"""Monte Carlo validation (paper 2: 100 iterations): re-split by patient, train and test again
with seed = config.seed + i, then summarise how the test scores vary.

Iteration i lives in `<workdir>/mc/<i>/`. It is done when its eval/test/metrics.json exists;
an interrupted one resumes from its checkpoint, so the whole run can be restarted at will.
"""
import copy
import json
import os

import ml_collections
from absl import logging

from allflax import files
from allflax.evaluation import plots, stats
from allflax.training import loop

# What a Monte Carlo run writes at the top of its workdir; each iteration is a run in mc/<i>/.
ENTRIES = frozenset({'mc', 'montecarlo.json', 'montecarlo.png'})
METRICS = ('accuracy', 'balanced_accuracy', 'f1_weighted', 'f1_macro', 'precision_macro',
           'recall_macro', 'specificity_macro', 'roc_auc', 'cohen_kappa', 'ece')


def iteration_config(config: ml_collections.ConfigDict, iteration: int) -> ml_collections.ConfigDict:
    """The config of iteration i: a new seed, which changes both the split and the initialisation."""
    iteration_config = copy.deepcopy(config)
    iteration_config.seed = config.seed + iteration
    return iteration_config


def run_iteration(config: ml_collections.ConfigDict, workdir: str, iteration: int) -> dict:
    """The test metrics of iteration i, training it (or finishing it) only if they are missing."""
    directory = os.path.join(workdir, 'mc', str(iteration))
    path = os.path.join(directory, 'eval', 'test', 'metrics.json')
    if os.path.exists(path):
        logging.info('Monte Carlo iteration %d already done: %s', iteration, path)
        with open(path) as f:
            return json.load(f)
    logging.info('Monte Carlo iteration %d of %d (seed %d)', iteration + 1,
                 config.montecarlo.iterations, config.seed + iteration)
    return loop.train_and_evaluate(iteration_config(config, iteration), directory)


def summarize(results: list[dict]) -> dict:
    """Per metric: mean, s.d., percentile and t 95 % intervals; patient-level too where every
    iteration has it."""
    summary = {name: stats.summarize([r[name] for r in results]) for name in METRICS}
    if all('patient_level' in r for r in results):
        summary['patient_level'] = {name: stats.summarize([r['patient_level'][name] for r in results])
                                    for name in METRICS}
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the missing iterations and writes `workdir/montecarlo.json` and `montecarlo.png`;
    refuses a `workdir` holding files that a Monte Carlo run does not write."""
    files.refuse_foreign_folder(workdir, 'Monte Carlo workdir', ENTRIES.__contains__)
    files.refuse_foreign_folder(os.path.join(workdir, 'mc'), 'Monte Carlo workdir', str.isdigit)
    results = [run_iteration(config, workdir, i) for i in range(config.montecarlo.iterations)]
    summary = {
        'iterations': len(results),
        'seeds': [config.seed + i for i in range(len(results))],
        'metrics': summarize(results),
        'per_iteration': {name: [r[name] for r in results] for name in METRICS},
    }
    files.write_json(os.path.join(workdir, 'montecarlo.json'), summary)
    plot(summary['per_iteration'], os.path.join(workdir, 'montecarlo.png'))
    return summary


def plot(per_iteration: dict[str, list], path: str) -> str:
    names = [name for name in METRICS if name != 'ece']  # ECE's scale (near 0) is another axis's.
    figure, axes = plots.plt.subplots(figsize=(1.1 * len(names) + 2, 4))
    axes.boxplot([[v for v in per_iteration[name] if v is not None] for name in names])
    axes.set_xticks(range(1, len(names) + 1))
    axes.set_xticklabels(names, rotation=30, ha='right')
    axes.set(ylabel='Test score', title=f'Monte Carlo validation: {len(per_iteration["accuracy"])} iterations')
    axes.grid(axis='y', alpha=0.3)
    return plots.save_figure(figure, path)
