"""Two runs on the same images: is one better, or is the difference chance?

Reads each run's `eval/<split>/predictions.csv` (written by evaluation), refuses runs whose
splits.json record other members of the split, pairs the images,
and writes compare.json and compare.html: McNemar's exact test on the images one run gets
right and the other wrong, and paired bootstrap intervals of the differences (patients, or images
without patient ids, drawn within their class).
"""
import csv
import dataclasses
import json
import os

import numpy as np

from allflax import files
from allflax.data import membership
from allflax.data.dataset import read_splits_json
from allflax.evaluation import html, metrics, stats

TITLE = 'Comparison of two runs'
SCORES = ('accuracy', 'balanced_accuracy', 'f1_macro', 'f1_weighted', 'roc_auc', 'cohen_kappa')


@dataclasses.dataclass(frozen=True)
class RunPredictions:
    workdir: str
    class_names: tuple[str, ...]
    image_ids: list[str]
    patients: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray


def read_predictions(workdir: str, split_name: str) -> RunPredictions:
    path = os.path.join(workdir, 'eval', split_name, 'predictions.csv')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: evaluate the run first '
                                f'(python main.py --mode=eval --workdir={workdir} --split={split_name})')
    with open(path, newline='') as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    class_names = tuple(header[header.index('predicted_class') + 1:])
    column = {name: header.index(name) for name in ('image_id', 'patient', 'label')}
    index_of = {name: k for k, name in enumerate(class_names)}
    return RunPredictions(
        workdir=workdir, class_names=class_names,
        image_ids=[row[column['image_id']] for row in rows],
        patients=np.array([row[column['patient']] for row in rows], str),
        labels=np.array([index_of[row[column['label']]] for row in rows], np.int64),
        probabilities=np.array([row[len(header) - len(class_names):] for row in rows], np.float64))


def check_same_images(a: RunPredictions, b: RunPredictions):
    """Refuses runs scored on different images (or classes): their scores are not comparable."""
    if a.class_names != b.class_names:
        raise ValueError(f'the runs have different classes: {a.class_names} in {a.workdir}, '
                         f'{b.class_names} in {b.workdir}')
    if a.image_ids != b.image_ids or not np.array_equal(a.labels, b.labels):
        only_a = len(set(a.image_ids) - set(b.image_ids))
        only_b = len(set(b.image_ids) - set(a.image_ids))
        raise ValueError(
            f'the runs were evaluated on different images ({len(a.image_ids)} in {a.workdir}, '
            f'{len(b.image_ids)} in {b.workdir}; {only_a} only in the first, {only_b} only in the '
            f'second, or the same images in another order or with other labels): a paired comparison '
            f'needs both runs evaluated on the same split of the same data (same data config and seed)')


def check_same_members(workdirs: list[str], split_name: str):
    """Refuses, in one line, runs whose splits.json record different members of the split: their
    scores are on different images. Runs that record none are left to `check_same_images`."""
    recorded = [read_splits_json(workdir) or {} for workdir in workdirs]
    differing = membership.differing_members(*recorded, split_name)
    if differing:
        sizes = [len(r['members']['splits'][split_name]) for r in recorded]
        raise membership.SplitsChanged(
            f'runs {workdirs[0]} and {workdirs[1]} have different {split_name} members ({sizes[0]} and {sizes[1]}; '
            f'{differing} in one run\'s {split_name} split and not the other\'s): a paired comparison needs both '
            f'runs split alike on the same data')


def compare(workdirs: list[str], split_name: str = 'test', output_dir: str = '.', *,
            samples: int = 1000, seed: int = 0) -> dict:
    """Compares run A = workdirs[0] with run B = workdirs[1]; differences are A − B."""
    if len(workdirs) != 2:
        raise ValueError(f'compare needs exactly two runs, got {len(workdirs)}: {workdirs}')
    json_path, html_path = os.path.join(output_dir, 'compare.json'), os.path.join(output_dir, 'compare.html')
    files.refuse_unless_replaceable(json_path, 'compare.json', _is_comparison)
    files.refuse_unless_replaceable(html_path, 'compare.html', html.page_titled(TITLE))
    check_same_members(workdirs, split_name)
    a, b = (read_predictions(workdir, split_name) for workdir in workdirs)
    check_same_images(a, b)
    patients = stats.known_patients(a.patients)
    scores = {run.workdir: {name: metrics.classification_metrics(run.labels, run.probabilities,
                                                                 run.class_names)[name] for name in SCORES}
              for run in (a, b)}
    correct_a, correct_b = (run.probabilities.argmax(axis=1) == run.labels for run in (a, b))
    result = {
        'a': a.workdir, 'b': b.workdir, 'split': split_name, 'num_examples': len(a.labels),
        'scores': scores,
        'mcnemar': stats.mcnemar_exact(correct_a, correct_b),
        'difference_a_minus_b': stats.paired_bootstrap_difference(
            a.labels, a.probabilities, b.probabilities, patients, samples=samples, seed=seed),
        'bootstrap': {'samples': samples, 'seed': seed,
                      'resampled': 'images' if patients is None else 'patients', 'within': 'class'},
    }
    os.makedirs(output_dir, exist_ok=True)
    files.write_json(json_path, result)
    _write_html(result, html_path)
    return result


def _is_comparison(path: str) -> bool:
    """Whether `path` holds a compare.json of allflax's."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {'a', 'b', 'mcnemar', 'difference_a_minus_b'} <= values.keys()


def _write_html(result: dict, path: str):
    a, b = result['a'], result['b']
    mcnemar = result['mcnemar']
    rows = [[name, html.number(result['scores'][a][name]), html.number(result['scores'][b][name])]
            for name in SCORES]
    differences = [[name, html.number(d['difference']), html.interval(d['ci95']), d['ci95_method']]
                   for name, d in result['difference_a_minus_b'].items()]
    body = ''.join([
        html.table(None, [['A', a], ['B', b], ['Split', f'{result["split"]}: {result["num_examples"]} images']]),
        '<h2>Scores</h2>', html.table(['Metric', 'A', 'B'], rows),
        '<h2>McNemar exact test</h2>',
        html.table(['Only A right', 'Only B right', 'p (two-sided)'],
                     [[mcnemar['only_a_correct'], mcnemar['only_b_correct'], f'{mcnemar["p_value"]:.4g}']]),
        '<p class="note">Under "equally accurate", the images exactly one run gets right split '
        '50:50 between them; p is the exact binomial probability of a split at least this uneven.</p>',
        '<h2>Difference A − B</h2>', html.table(['Metric', 'A − B', '95 % interval', 'Method'], differences),
        f'<p class="note">Paired percentile bootstrap: {result["bootstrap"]["resampled"]} drawn within their '
        'class (every resample holds every class), both runs scored on each resample.</p>'])
    html.write_page(path, TITLE, body)
