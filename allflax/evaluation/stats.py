"""Uncertainty of the scores: bootstrap intervals, McNemar's test, intervals over repeated runs.

A bootstrap resample is a row of weights, how often each example was drawn; resampling
patients draws whole patients (all their cells together), since cells of one patient are
not independent. Every resample is scored at once, by the metrics' batched code.
"""
import numpy as np
import scipy.stats

from allflax.evaluation import metrics

INTERVAL_METRICS = ('accuracy', 'f1_weighted', 'f1_macro', 'roc_auc')
LEVEL = 0.95


def known_patients(patients) -> np.ndarray | None:
    """The patient ids when every example has one, else None (some sources have no ids: '')."""
    patients = np.asarray(patients, str)
    return patients if len(patients) and np.all(patients != '') else None


def bootstrap_weights(num_examples: int, clusters: np.ndarray | None, *, samples: int,
                      seed: int) -> np.ndarray:
    """(samples, num_examples) draw counts: examples drawn with replacement, or whole
    clusters (patients) when `clusters` gives each example's cluster."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.multinomial(num_examples, np.full(num_examples, 1 / num_examples),
                               size=samples).astype(np.float64)
    ids, index = np.unique(clusters, return_inverse=True)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=samples)
    return counts[:, index].astype(np.float64)


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
    weights = bootstrap_weights(len(labels), clusters, samples=samples, seed=seed)
    return {name: percentile_interval(values)
            for name, values in resampled_scores(labels, probabilities, weights).items()}


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
    weights = bootstrap_weights(len(labels), clusters, samples=samples, seed=seed)
    point = np.ones((1, len(labels)))
    result = {}
    a, b = (resampled_scores(labels, p, weights) for p in (probabilities_a, probabilities_b))
    a_point, b_point = (resampled_scores(labels, p, point) for p in (probabilities_a, probabilities_b))
    for name in names:
        result[name] = {'difference': float(a_point[name][0] - b_point[name][0]),
                        'ci95': percentile_interval(a[name] - b[name])}
    return result


def summarize(values) -> dict:
    """Mean, standard deviation and two 95 % intervals of repeated-run values: the percentile
    interval (where single runs fall) and the t-interval of the mean (how well it is known)."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return {'n': 0, 'mean': None, 'std': None, 'percentile_95': None, 't_interval_95': None}
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if len(values) > 1:
        half_width = scipy.stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * std / np.sqrt(len(values))
        t_interval = [mean - float(half_width), mean + float(half_width)]
    else:
        t_interval = None
    return {'n': int(len(values)), 'mean': mean, 'std': std,
            'percentile_95': percentile_interval(values), 't_interval_95': t_interval}
