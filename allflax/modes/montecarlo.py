"""Monte Carlo validation (paper 2: 100 iterations): re-split by patient, train and test again
with seed = config.seed + i, then summarise how the test scores vary: the percentile range of
the runs, and the mean's corrected resampled t-interval (the re-splits overlap).

Iteration i lives in `<workdir>/mc/<i>/`. It is done when its eval/test/metrics.json exists;
an interrupted one resumes from its checkpoint, so the whole run can be restarted at will.
"""
import copy
import json
import os
from html import escape

import ml_collections
import numpy as np
from absl import logging

from allflax import files
from allflax.evaluation import html, plots, stats
from allflax.training import loop

# What a Monte Carlo run writes at the top of its workdir; each iteration is a run in mc/<i>/.
ENTRIES = frozenset({'mc', 'montecarlo.json', 'montecarlo.png', 'montecarlo.html'})
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


def split_sizes(directory: str, result: dict) -> dict[str, tuple[int, int]]:
    """The iteration in `directory`'s (n_test, n_train) from its splits.json: in 'images', and in
    'patients' where its split kept every patient whole (the re-splits draw patients, the
    independent units)."""
    with open(os.path.join(directory, 'splits.json')) as f:
        sizes = json.load(f)
    counted = {'images': (sizes['test']['num_examples'], sizes['train']['num_examples'])}
    level = result.get('split_independence', {}).get('level', 'patient' if 'patient_level' in result else 'image')
    if level == 'patient':
        counted['patients'] = (len(sizes['test']['patients']), len(sizes['train']['patients']))
    return counted


def methods(sizes: list[dict[str, tuple[int, int]]]) -> dict:
    """The two intervals' methods, and the n_test and n_train behind the correction: in patients
    where every iteration split by patient, else in images; their means over the iterations
    (re-splits can differ by a unit or two)."""
    unit = 'patients' if all('patients' in size for size in sizes) else 'images'
    n_test, n_train = (float(np.mean([size[unit][k] for size in sizes])) for k in (0, 1))
    return {'corrected_t_interval_95': stats.corrected_t_method(n_test, n_train, unit),
            'percentile_95': stats.PERCENTILE_METHOD,
            'unit': unit, 'n_test': n_test, 'n_train': n_train, 'test_train_ratio': n_test / n_train}


def summarize(results: list[dict], test_train_ratio: float) -> dict:
    """Per metric: mean, s.d., the corrected resampled t-interval and the percentile range;
    patient-level too where every iteration has it."""
    summary = {name: stats.summarize([r[name] for r in results], test_train_ratio=test_train_ratio)
               for name in METRICS}
    if all('patient_level' in r for r in results):
        summary['patient_level'] = {
            name: stats.summarize([r['patient_level'][name] for r in results], test_train_ratio=test_train_ratio)
            for name in METRICS}
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the missing iterations and writes `workdir/montecarlo.json`, `.png` and `.html`;
    refuses a `workdir` holding files that a Monte Carlo run does not write."""
    files.refuse_foreign_folder(workdir, 'Monte Carlo workdir', ENTRIES.__contains__)
    files.refuse_foreign_folder(os.path.join(workdir, 'mc'), 'Monte Carlo workdir', str.isdigit)
    results = [run_iteration(config, workdir, i) for i in range(config.montecarlo.iterations)]
    described = methods([split_sizes(os.path.join(workdir, 'mc', str(i)), r) for i, r in enumerate(results)])
    summary = {
        'iterations': len(results),
        'seeds': [config.seed + i for i in range(len(results))],
        'methods': described,
        'metrics': summarize(results, described['test_train_ratio']),
        'per_iteration': {name: [r[name] for r in results] for name in METRICS},
    }
    files.write_json(os.path.join(workdir, 'montecarlo.json'), summary)
    names = [name for name in METRICS if name != 'ece']  # ECE's scale (near 0) is another axis's.
    figure = plots.plot_repeated_runs({name: summary['per_iteration'][name] for name in names},
                                      summary['metrics'], os.path.join(workdir, 'montecarlo.png'),
                                      corrected_method=described['corrected_t_interval_95'],
                                      percentile_method=described['percentile_95'])
    write_page(summary, figure, os.path.join(workdir, 'montecarlo.html'))
    return summary


def write_page(summary: dict, figure: str, path: str) -> str:
    """montecarlo.html: per metric the mean, s.d. and both intervals, each method named; the plot."""
    described = summary['methods']
    levels = [('Per image', summary['metrics'])]
    if 'patient_level' in summary['metrics']:
        levels.append(('Per patient (mean probability of its cells)', summary['metrics']['patient_level']))
    body = [html.table(None, [['Iterations', summary['iterations']],
                              ['Seeds', f'{summary["seeds"][0]}–{summary["seeds"][-1]}'],
                              ['Test / train per re-split', f'{described["n_test"]:g} / {described["n_train"]:g} '
                                                            f'{described["unit"]}']])]
    for title, values in levels:
        rows = [[name, html.number(v['mean']), html.number(v['std']), html.interval(v['corrected_t_interval_95']),
                 html.interval(v['percentile_95'])] for name, v in values.items() if name in METRICS]
        body += [f'<h2>{title}</h2>', html.table(
            ['Metric', 'Mean', 's.d.', 'Mean: corrected t 95 % (1)', 'Runs: percentile range (2)'], rows)]
    body += [f'<p class="note">(1) {escape(described["corrected_t_interval_95"])}: the re-splits share most '
             'of their training and test data, so their scores are correlated and the plain t-interval '
             f'(s²/J) would be too narrow. (2) {escape(described["percentile_95"])}.</p>',
             html.embed_png(figure, 'Monte Carlo scores')]
    return html.write_page(path, f'Monte Carlo validation: {summary["iterations"]} re-splits', ''.join(body))
