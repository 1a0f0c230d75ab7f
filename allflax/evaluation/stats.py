"""Uncertainty of the scores: bootstrap and exact intervals, McNemar's test, intervals over repeated runs.

A bootstrap resample is a row of weights, how often each example was drawn; resampling
patients draws whole patients (all their cells together), since cells of one patient are
not independent. Units are drawn within their class, so every resample holds every class as
often as the data: a test split of 7 patients with one of some class would otherwise lose it
in a third of the resamples and score its F1 as 0. Every resample is scored at once, by the
metrics' batched code. Proportions (accuracy, sensitivity, specificity over independent units)
get Clopper–Pearson intervals instead, which stay valid at any number of units.
"""
import numpy as np
import scipy.stats

from allflax.evaluation import metrics

INTERVAL_METRICS = ('accuracy', 'f1_weighted', 'f1_macro', 'roc_auc')
LEVEL = 0.95
SMALL_CLASS = 3  # A class with fewer test patients has an interval that cannot show variation between them.


def known_patients(patients) -> np.ndarray | None:
    """The patient ids when every example has one, else None (some sources have no ids: '')."""
    patients = np.asarray(patients, str)
    return patients if len(patients) and np.all(patients != '') else None


def strata(labels: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, dict[tuple, np.ndarray]]:
    """(each example's unit, {stratum: its units}). Units are the clusters (patients, sorted),
    or the examples when `clusters` is None; a unit's stratum is the set of labels among its
    examples: its class, or for a patient with cells of several classes, the patients with that
    same set of classes (so each class keeps, in every resample, a unit that holds it). Strata are
    in the order of their sorted label tuples: (0,), (0, 1), (1,), ..."""
    labels = np.asarray(labels, np.int64)
    unit_of = (np.arange(len(labels)) if clusters is None
               else np.unique(np.asarray(clusters), return_inverse=True)[1].ravel())
    presence = np.zeros((unit_of.max() + 1, labels.max() + 1), bool)
    presence[unit_of, labels] = True
    keys = [tuple(np.flatnonzero(row).tolist()) for row in presence]
    members = {}
    for unit, key in enumerate(keys):
        members.setdefault(key, []).append(unit)
    return unit_of, {key: np.array(members[key]) for key in sorted(members)}


def bootstrap_weights(labels: np.ndarray, clusters: np.ndarray | None, *, samples: int,
                      seed: int) -> np.ndarray:
    """(samples, examples) draw counts: within each stratum (see `strata`) as many units as it
    holds, drawn with replacement. One generator seeded by `seed` draws the strata in order, each
    as `samples` multinomial rows of equal probabilities."""
    unit_of, groups = strata(labels, clusters)
    rng = np.random.default_rng(seed)
    counts = np.zeros((samples, sum(len(units) for units in groups.values())))
    for units in groups.values():
        counts[:, units] = rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=samples)
    return counts[:, unit_of]


def bootstrap_method(labels: np.ndarray, clusters: np.ndarray | None, *, samples: int,
                     unit: str | None = None) -> str:
    """How `bootstrap_weights` resamples, in words; `unit` names the units (default: patients
    when `clusters` is given, else images)."""
    unit = unit or ('images' if clusters is None else 'patients')
    _, groups = strata(labels, clusters)
    mixed = ('; one with several classes among the ' + unit + ' with the same classes'
             if any(len(key) > 1 for key in groups) else '')
    return f'stratified {unit[:-1]} bootstrap ({unit} drawn within their class{mixed}), {samples} resamples'


def resampled_scores(labels: np.ndarray, probabilities: np.ndarray,
                     weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each of INTERVAL_METRICS for every resample (row of `weights`)."""
    matrices = metrics.confusion_matrix(labels, probabilities.argmax(axis=1), probabilities.shape[1],
                                        weights)
    scores = metrics.scores_from_confusion(matrices)
    scores['roc_auc'] = metrics.mean_over_classes(
        metrics.roc_auc_one_vs_rest(labels, probabilities, weights))
    return {name: scores[name] for name in INTERVAL_METRICS}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The central `level` interval of `values`, ignoring NaN (undefined in a resample); None if all are."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, clusters: np.ndarray | None,
                        *, samples: int, seed: int) -> dict[str, list[float] | None]:
    """Percentile bootstrap 95 % intervals {metric: [low, high]} of INTERVAL_METRICS."""
    weights = bootstrap_weights(labels, clusters, samples=samples, seed=seed)
    return {name: percentile_interval(values)
            for name, values in resampled_scores(labels, probabilities, weights).items()}


def exact_interval(successes: int, trials: int) -> list[float] | None:
    """The Clopper–Pearson 95 % interval of a proportion (covers at least 95 % at any number of
    trials; 7 of 7 gives [0.590, 1]); None without trials."""
    if trials == 0:
        return None
    interval = scipy.stats.binomtest(int(successes), int(trials)).proportion_ci(LEVEL, method='exact')
    return [float(interval.low), float(interval.high)]


def exact_method(trials: int, unit: str) -> str:
    """`exact_interval`'s method, with its number of trials: 'Clopper-Pearson exact, 7 patients'."""
    return f'Clopper-Pearson exact, {trials} {unit[:-1] if trials == 1 else unit}'


def add_exact_intervals(values: dict, unit: str):
    """Adds to `values` (classification_metrics of independent units, each one `unit`) the exact
    intervals of accuracy, and per class of recall (sensitivity) and specificity, with their methods."""
    matrix = np.asarray(values['confusion_matrix'], np.int64)
    total, correct = int(matrix.sum()), int(np.trace(matrix))
    values['ci95']['accuracy'] = exact_interval(correct, total)
    values['ci95_method']['accuracy'] = exact_method(total, unit)
    for k, name in enumerate(values['class_names']):
        positives = int(matrix[k].sum())
        true_negatives = total - positives - int(matrix[:, k].sum() - matrix[k, k])
        values['per_class'][name]['ci95'] = {'recall': exact_interval(matrix[k, k], positives),
                                             'specificity': exact_interval(true_negatives, total - positives)}
        values['per_class'][name]['ci95_method'] = {'recall': exact_method(positives, unit),
                                                    'specificity': exact_method(total - positives, unit)}


def small_classes_sentence(small: dict) -> str:
    """The sentence naming the classes with fewer than SMALL_CLASS test patients ({class: patients}), or ''."""
    if not small:
        return ''
    named = ', '.join(f'{name} ({n} patient{"" if n == 1 else "s"})' for name, n in small.items())
    return (f'Classes with fewer than {SMALL_CLASS} test patients: {named}. Their intervals cannot show variation '
            'between patients: the bootstrap can only redraw the same few patients of such a class.')


def patients_per_class(labels: np.ndarray, patients: np.ndarray, num_classes: int) -> np.ndarray:
    """How many patients have cells of each class."""
    _, patient_of = np.unique(np.asarray(patients), return_inverse=True)
    pairs = np.unique(np.stack([np.asarray(labels, np.int64), patient_of]), axis=1)
    return np.bincount(pairs[0], minlength=num_classes)


def metrics_with_intervals(labels: np.ndarray, probabilities: np.ndarray, patients: np.ndarray,
                           class_names: tuple[str, ...], *, samples: int, seed: int) -> dict:
    """classification_metrics with 95 % intervals and each interval's method (`ci95_method`):

    - with patient ids (every image has one): the cell-level scores' intervals by the stratified
      patient bootstrap; `patient_level` (each patient scored by the mean of its cells'
      probabilities, labelled by its most frequent cell label) with exact intervals of accuracy and
      per class of sensitivity and specificity over patients, bootstrap ones of the rest; and
      `small_classes`, the classes with fewer than SMALL_CLASS patients (their intervals cannot
      show variation between patients) with their numbers of patients;
    - without: exact intervals over images, bootstrap ones over images for the rest.
    """
    values = metrics.classification_metrics(labels, probabilities, class_names)
    known = known_patients(patients)
    values['ci95'] = bootstrap_intervals(labels, probabilities, known, samples=samples, seed=seed)
    method = bootstrap_method(labels, known, samples=samples)
    values['ci95_method'] = {name: method for name in values['ci95']}
    values['bootstrap'] = {'samples': samples, 'seed': seed,
                           'resampled': 'images' if known is None else 'patients', 'within': 'class'}
    if known is None:
        add_exact_intervals(values, 'images')
        return values
    patient_labels, patient_probabilities, _ = metrics.patient_level(labels, probabilities, known)
    patient_values = metrics.classification_metrics(patient_labels, patient_probabilities, class_names)
    patient_values['ci95'] = bootstrap_intervals(patient_labels, patient_probabilities, None,
                                                 samples=samples, seed=seed)
    method = bootstrap_method(patient_labels, None, samples=samples, unit='patients')
    patient_values['ci95_method'] = {name: method for name in patient_values['ci95']}
    add_exact_intervals(patient_values, 'patients')
    values['patient_level'] = patient_values
    values['small_classes'] = {name: int(n) for name, n in zip(
        class_names, patients_per_class(labels, known, len(class_names))) if n < SMALL_CLASS}
    return values


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test on paired predictions: under 'equally accurate', the discordant
    pairs split 50:50, so the count where only A is right is Binomial(discordant, 1/2)."""
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p_value = 1.0 if only_a + only_b == 0 else scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    return {'only_a_correct': only_a, 'only_b_correct': only_b, 'p_value': float(p_value)}


def paired_bootstrap_difference(labels: np.ndarray, probabilities_a: np.ndarray,
                                probabilities_b: np.ndarray, clusters: np.ndarray | None, *,
                                samples: int, seed: int,
                                names: tuple[str, ...] = ('accuracy', 'f1_macro')) -> dict:
    """A − B for each metric in `names`: the point difference and its 95 % interval, both runs
    scored on the same resamples (so what the images share cancels out)."""
    weights = bootstrap_weights(labels, clusters, samples=samples, seed=seed)
    method = 'paired ' + bootstrap_method(labels, clusters, samples=samples)
    point = np.ones((1, len(labels)))
    result = {}
    a, b = (resampled_scores(labels, p, weights) for p in (probabilities_a, probabilities_b))
    a_point, b_point = (resampled_scores(labels, p, point) for p in (probabilities_a, probabilities_b))
    for name in names:
        result[name] = {'difference': float(a_point[name][0] - b_point[name][0]),
                        'ci95': percentile_interval(a[name] - b[name]), 'ci95_method': method}
    return result


PERCENTILE_METHOD = 'percentile range (2.5-97.5 %) of the runs: where a single run falls'


def corrected_t_method(n_test: float, n_train: float, unit: str) -> str:
    """`summarize`'s corrected interval, in words, with its ratio: what a reader needs to redo it."""
    return (f'corrected resampled t (Nadeau and Bengio 2003) of the mean: mean ± t(0.975, J-1) · '
            f'sqrt((1/J + n_test/n_train) · s²), n_test/n_train = {n_test:g}/{n_train:g} {unit} per re-split')


def summarize(values, *, test_train_ratio: float) -> dict:
    """Mean, standard deviation and two 95 % intervals of the J runs of re-splits of one data set:

    - `percentile_95`: the percentile range of the runs (where a single run falls);
    - `corrected_t_interval_95`: how well the mean is known, by Nadeau and Bengio's (2003) corrected
      resampled t: mean ± t(0.975, J − 1) · sqrt((1/J + n_test/n_train) · s²), s² the runs' sample
      variance. Re-splits share most of their training and test units, so the runs are correlated
      and the plain t-interval (s²/J) is too narrow; `test_train_ratio` is n_test/n_train.
    """
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return {'n': 0, 'mean': None, 'std': None, 'percentile_95': None, 'corrected_t_interval_95': None}
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    corrected = None
    if len(values) > 1:
        half_width = scipy.stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * np.sqrt(
            (1 / len(values) + test_train_ratio) * std ** 2)
        corrected = [mean - float(half_width), mean + float(half_width)]
    return {'n': int(len(values)), 'mean': mean, 'std': std,
            'percentile_95': percentile_interval(values), 'corrected_t_interval_95': corrected}
