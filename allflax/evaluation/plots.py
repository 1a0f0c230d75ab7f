"""The report's plots, as PNG files: confusion matrix, one-vs-rest ROC and precision-recall,
reliability, training curves, squeeze-and-excitation gates; and the scores of repeated runs
(Monte Carlo re-splits)."""
import json
import os

import matplotlib

matplotlib.use('Agg')  # Files only: no display, the same on servers and laptops.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from allflax.evaluation import calibration  # noqa: E402


def save_figure(figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_confusion_matrix(matrix, class_names, path: str) -> str:
    """Counts, and each true class's row as percentages (colour), so small classes read too."""
    matrix = np.asarray(matrix)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 1.1 * len(class_names)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    image = axes.imshow(rows, cmap='Blues', vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, f'{count}\n{100 * rows[i, j]:.0f} %', ha='center', va='center', fontsize=9,
                  color='white' if rows[i, j] > 0.6 else 'black')
    axes.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel='Predicted class',
             ylabel='True class', title='Confusion matrix (count, % of true class)')
    axes.set_xticklabels(class_names, rotation=30, ha='right')
    axes.set_yticklabels(class_names)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return save_figure(figure, path)


def plot_one_vs_rest(labels, probabilities, class_names, path: str, kind: str) -> str:
    """ROC (`kind='roc'`) or precision-recall (`'pr'`) curve of each class against the rest."""
    figure, axes = plt.subplots(figsize=(5.4, 4.6))
    for k, name in enumerate(class_names):
        positive = labels == k
        if not positive.any() or positive.all():
            continue
        if kind == 'roc':
            x, y, _ = skm.roc_curve(positive, probabilities[:, k])
            axes.plot(x, y, label=f'{name} (AUC {skm.auc(x, y):.3f})')
        else:
            y, x, _ = skm.precision_recall_curve(positive, probabilities[:, k])
            ap = skm.average_precision_score(positive, probabilities[:, k])
            axes.plot(x, y, drawstyle='steps-post', label=f'{name} (AP {ap:.3f})')
    if kind == 'roc':
        axes.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
        axes.set(xlabel='False positive rate', ylabel='True positive rate', title='ROC, one class vs rest')
    else:
        axes.set(xlabel='Recall', ylabel='Precision', title='Precision-recall, one class vs rest')
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    axes.legend(loc='best', fontsize=8)
    return save_figure(figure, path)


def plot_operating_point(labels, scores, positive: int, band, point: dict, path: str) -> str:
    """The positive class's ROC with its 95 % bootstrap band, and the operating point chosen on val."""
    figure, axes = plt.subplots(figsize=(5.4, 4.6))
    grid, low, high = band
    axes.fill_between(grid, low, high, color='tab:blue', alpha=0.2, linewidth=0, label='95 % band (patient bootstrap)')
    x, y, _ = skm.roc_curve(np.asarray(labels) == positive, scores)
    axes.plot(x, y, color='tab:blue', label=f'{point["positive_class"]} (AUC {skm.auc(x, y):.3f})')
    axes.plot([1 - point['specificity']], [point['sensitivity']], 'o', color='tab:red',
              label=f'threshold {point["threshold"]:.3g} (chosen on val)')
    axes.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
    axes.set(xlabel='False positive rate', ylabel='True positive rate', title='ROC and operating point',
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    axes.legend(loc='lower right', fontsize=8)
    return save_figure(figure, path)


def plot_calibration(labels, curves: dict[str, np.ndarray], path: str) -> str:
    """Reliability diagram: accuracy against mean confidence per bin, one line per probability
    set in `curves` ({name: probabilities}), and how many images each bin holds."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.4, 5.6), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1, label='perfectly calibrated')
    for name, probabilities in curves.items():
        bins = calibration.reliability(labels, probabilities)
        filled = bins['count'] > 0
        ece = calibration.expected_calibration_error(labels, probabilities)
        top.plot(bins['confidence'][filled], bins['accuracy'][filled], marker='o', label=f'{name} (ECE {ece:.3f})')
        centres = (bins['edges'][:-1] + bins['edges'][1:]) / 2
        bottom.bar(centres, bins['count'], width=0.9 / len(centres), alpha=0.5, label=name)
    top.set(ylabel='Accuracy', title=f'Reliability ({calibration.NUM_BINS} bins of top-class probability)',
            xlim=(0, 1), ylim=(0, 1.02))
    top.legend(loc='upper left', fontsize=8)
    bottom.set(xlabel='Confidence (top-class probability)', ylabel='Images')
    return save_figure(figure, path)


def read_training_log(path: str) -> list[dict]:
    """metrics.jsonl records; a step logged twice (re-run after resuming) keeps its last record."""
    if not os.path.exists(path):
        return []
    records = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            records[(record['step'], tuple(sorted(record)))] = record
    return sorted(records.values(), key=lambda r: r['step'])


def plot_training_curves(records: list[dict], path: str) -> str:
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 3.8))

    def series(key):
        points = [(r['step'], r[key]) for r in records if key in r]
        return tuple(zip(*points)) if points else ((), ())

    loss_axes.plot(*series('train_loss'), label='train (focal loss)')
    loss_axes.set(xlabel='Step', ylabel='Loss', title='Training loss')
    accuracy_axes.plot(*series('train_accuracy'), label='train')
    accuracy_axes.plot(*series('val_accuracy'), marker='o', label='validation')
    accuracy_axes.set(xlabel='Step', ylabel='Accuracy', title='Accuracy', ylim=(0, 1.02))
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return save_figure(figure, path)


def plot_se_gates(gates: np.ndarray, path: str, top: int = 20) -> tuple[str, list[int]]:
    """The channels the SE block weighs most, mean gate ± s.d. over the images given."""
    mean, spread = gates.mean(axis=0), gates.std(axis=0)
    channels = np.argsort(-mean)[:top]
    figure, axes = plt.subplots(figsize=(8, 3.4))
    axes.bar(range(len(channels)), mean[channels], yerr=spread[channels], color='#5c6bc0', capsize=2)
    axes.set_xticks(range(len(channels)))
    axes.set_xticklabels(channels, rotation=60, fontsize=8)
    axes.set(xlabel='Channel of the last feature map', ylabel='SE gate', ylim=(0, 1),
             title=f'Squeeze-and-excitation: top {len(channels)} channels, over {len(gates)} images')
    return save_figure(figure, path), channels.tolist()


def plot_repeated_runs(per_run: dict[str, list], summary: dict[str, dict], path: str, *, corrected_method: str,
                       percentile_method: str) -> str:
    """Per metric: each run's score (a dot), the percentile range of the runs (a grey bar) and the
    mean with its corrected resampled t-interval (black), both methods named in the legend."""
    names = list(per_run)
    figure, axes = plt.subplots(figsize=(1.1 * len(names) + 4, 4.6))
    jitter = np.random.default_rng(0)
    for x, name in enumerate(names, 1):
        values = [v for v in per_run[name] if v is not None]
        axes.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=10, color='tab:blue', alpha=0.5,
                     label='runs' if x == 1 else None)
        entry = summary[name]
        if entry['percentile_95']:
            low, high = entry['percentile_95']
            axes.plot([x + 0.22] * 2, [low, high], color='0.6', linewidth=6, solid_capstyle='butt',
                      label='percentile range' if x == 1 else None)
        if entry['corrected_t_interval_95']:
            low, high = entry['corrected_t_interval_95']
            axes.errorbar(x + 0.34, entry['mean'], yerr=[[entry['mean'] - low], [high - entry['mean']]], fmt='o',
                          color='black', capsize=3, markersize=4,
                          label='mean, corrected t-interval' if x == 1 else None)
    axes.set_xticks(range(1, len(names) + 1))
    axes.set_xticklabels(names, rotation=30, ha='right')
    runs = max(len(v) for v in per_run.values())
    axes.set(ylabel='Test score', title=f'{runs} Monte Carlo re-splits: 95 % intervals')
    axes.grid(axis='y', alpha=0.3)
    axes.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0), fontsize=7)
    figure.text(0.01, 0.01, f'Grey: {percentile_method}.\nBlack: {corrected_method}.', fontsize=6.5,
                va='bottom', wrap=True)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
