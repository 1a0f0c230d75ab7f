"""The evaluation report: one self-contained HTML page (plots embedded as PNG) per split, with
each plot also saved beside it, and the small HTML helpers compare and Monte Carlo reuse."""
import base64
import html
import json
import os

import jax
import matplotlib

matplotlib.use('Agg')  # Files only: no display, the same on servers and laptops.
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from allflax import calibration, evaluate, interpret, stats  # noqa: E402
from allflax.data.dataset import Split  # noqa: E402

# Metric keys of metrics.json, as the report names them.
SUMMARY_METRICS = {
    'accuracy': 'Accuracy', 'balanced_accuracy': 'Balanced accuracy (mean recall)',
    'f1_weighted': 'F1, weighted by class size', 'f1_macro': 'F1, mean over classes',
    'precision_macro': 'Precision, mean over classes', 'recall_macro': 'Recall (sensitivity), mean over classes',
    'specificity_macro': 'Specificity, mean over classes', 'roc_auc': 'ROC-AUC, mean over classes',
    'cohen_kappa': "Cohen's kappa", 'ece': 'Expected calibration error (lower is better)',
    'nll': 'Negative log-likelihood (lower is better)'}
_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1160px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f5f5; }
table.facts td { text-align: left; } table.facts td:first-child { color: #555; }
img.plot { max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.row img.plot { max-width: 540px; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; padding: 0.4em; border: 3px solid #2e7d32; border-radius: 4px; }
figure.wrong { border-color: #c62828; }
figure img { display: block; height: 112px; }
figcaption { font-size: 0.85em; max-width: 360px; }
.note { color: #555; font-size: 0.9em; }
"""


# --- HTML ------------------------------------------------------------------------------------

def embed_png(path: str, alt: str, css_class: str = 'plot') -> str:
    with open(path, 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table; without a header, a two-column list of facts."""
    head = '' if header is None else '<tr>' + ''.join(f'<th>{html.escape(str(h))}</th>' for h in header) + '</tr>'
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(str(c))}</td>' for c in row) + '</tr>' for row in rows)
    return f'<table class="{"facts" if header is None else "values"}">{head}{body}</table>'


def number(value, digits: int = 4) -> str:
    return '–' if value is None else f'{value:.{digits}f}'


def interval(bounds) -> str:
    return '–' if bounds is None else f'[{bounds[0]:.4f}, {bounds[1]:.4f}]'


def write_page(path: str, title: str, body: str) -> str:
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>')
    with open(path, 'w') as f:
        f.write(page)
    return path


# --- Plots -----------------------------------------------------------------------------------

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


# --- The split report ------------------------------------------------------------------------

def _metrics_tables(values: dict) -> str:
    patient = values.get('patient_level')
    header = ['Metric', 'Images', '95 % interval'] + (['Patients', '95 % interval'] if patient else [])
    rows = []
    for name, label in SUMMARY_METRICS.items():
        row = [label, number(values[name]), interval(values['ci95'].get(name)) if name in values['ci95'] else '']
        if patient:
            row += [number(patient[name]), interval(patient['ci95'].get(name)) if name in patient['ci95'] else '']
        rows.append(row)
    per_class = [[name, number(c['precision']), number(c['recall']), number(c['f1']),
                  number(c['specificity']), number(c['roc_auc']), c['support']]
                 for name, c in values['per_class'].items()]
    return (table(header, rows)
            + '<h3>Per class (images)</h3>'
            + table(['Class', 'Precision', 'Recall', 'F1', 'Specificity', 'ROC-AUC', 'Images'], per_class))


def _gallery(entries: list[dict], explanation: dict) -> str:
    if not entries:
        return '<p class="note">No images to show.</p>'
    columns = 'image · Grad-CAM' + (' · self-attention received' if 'attention' in explanation else '')
    height, width = explanation['gradcam'].shape[1:]
    figures = ''.join(
        f'<figure class="{"" if e["correct"] else "wrong"}">{embed_png(e["path"], e["caption"], "panel")}'
        f'<figcaption>{html.escape(e["caption"])}</figcaption></figure>' for e in entries)
    return (f'<p class="note">Each panel: {columns}, for the predicted class. Green: correct, red: wrong; '
            f'(p) is the predicted probability. Heat maps come from the {height}×{width} last feature map, '
            f'upsampled, each scaled to its own maximum (so a map says where, not how much).</p>'
            f'<div class="gallery">{figures}</div>')


def write_gallery(config: ml_collections.ConfigDict, directory: str, split, class_names,
                  probabilities: np.ndarray, restored) -> tuple[list[dict], dict]:
    """Grad-CAM (and attention) panels of `config.eval.gradcam_examples` chosen images into
    `directory/gradcam/`; returns the gallery entries and the raw explanation."""
    indices = interpret.select_examples(split.labels, probabilities, config.eval.gradcam_examples)
    if not len(indices):
        return [], {}
    chosen = Split(np.stack([split.images[i] for i in indices]), split.labels[indices], split.patients[indices])
    explanation = interpret.explain_split(restored, config, chosen)
    predicted = probabilities[indices].argmax(axis=1)
    correct = predicted == split.labels[indices]
    names = [interpret.example_name(rank, class_names[t], class_names[p])
             for rank, (t, p) in enumerate(zip(split.labels[indices], predicted))]
    images = [interpret.display_rgb(image, config.data.preprocess) for image in chosen.images]
    paths = interpret.write_panels(os.path.join(directory, 'gradcam'), images, explanation, names)
    entries = [{'path': path, 'correct': bool(c),
                'caption': f'#{i}: true {class_names[t]}, predicted {class_names[p]} '
                           f'({probabilities[i, p]:.2f})'}
               for path, i, t, p, c in zip(paths, indices, split.labels[indices], predicted, correct)]
    return entries, explanation


def evaluate_with_report(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
                         checkpoint_step: int | None = None) -> dict:
    """--mode=eval: metrics.json and predictions.csv, then the report, its plots and the Grad-CAM
    gallery, all in `workdir/eval/<split>/`. Returns the metrics."""
    evaluation = evaluate.evaluate_checkpoint(config, workdir, split_name=split_name,
                                              checkpoint_step=checkpoint_step)
    write_split_report(config, workdir, evaluation)
    return evaluation.values


def write_split_report(config: ml_collections.ConfigDict, workdir: str, evaluation: evaluate.Evaluation) -> str:
    """Writes the plots, the Grad-CAM gallery and report.html into `workdir/eval/<split>/`."""
    split_name, dataset, values = evaluation.split_name, evaluation.dataset, evaluation.values
    predictions, restored = evaluation.predictions, evaluation.restored
    directory = evaluate.split_directory(workdir, split_name)
    split, class_names = dataset.splits[split_name], dataset.class_names
    labels, probabilities = split.labels, predictions.probabilities
    # Every process runs the jitted Grad-CAM; only the first writes files.
    entries, explanation = write_gallery(config, directory, split, class_names, probabilities, restored)
    if jax.process_index() != 0:
        return ''
    plots = {
        'confusion_matrix': plot_confusion_matrix(values['confusion_matrix'], class_names,
                                                  os.path.join(directory, 'confusion_matrix.png')),
        'roc': plot_one_vs_rest(labels, probabilities, class_names, os.path.join(directory, 'roc.png'), 'roc'),
        'pr': plot_one_vs_rest(labels, probabilities, class_names, os.path.join(directory, 'pr.png'), 'pr'),
    }
    curves = {'model': probabilities}
    if predictions.temperature != 1.0:
        curves = {'before scaling': calibration.probabilities(predictions.logits),
                  f'T = {predictions.temperature:.2f}': probabilities}
    plots['calibration'] = plot_calibration(labels, curves, os.path.join(directory, 'calibration.png'))
    plots['training_curves'] = plot_training_curves(
        read_training_log(os.path.join(workdir, 'metrics.jsonl')), os.path.join(directory, 'training_curves.png'))

    resampled = values['bootstrap']['resampled']
    patients = stats.known_patients(split.patients)
    facts = [['Run', os.path.abspath(workdir)], ['Model', config.model.name],
             ['Data', config.data.name], ['Split', f'{split_name}: {len(split)} images'
                                          + (f', {len(np.unique(patients))} patients' if patients is not None else '')],
             ['Checkpoint step', values['checkpoint_step']],
             ['Test-time augmentation', '8 dihedral views' if values['tta'] else 'off'],
             ['Temperature scaling', f'T = {predictions.temperature:.3f} (fitted on val)'
              if 'calibration' in values else 'off']]
    body = [table(None, facts),
            '<h2>Metrics</h2>', _metrics_tables(values),
            f'<p class="note">95 % intervals: percentile bootstrap, {values["bootstrap"]["samples"]} '
            f'resamples of {resampled}'
            + (' (whole patients, as their cells are not independent)' if resampled == 'patients' else '')
            + '. Patient-level scores use the mean of each patient\'s cell probabilities. '
              'ECE: expected calibration error, 15 bins. NLL: mean negative log-likelihood.</p>',
            '<h2>Confusion matrix</h2>', embed_png(plots['confusion_matrix'], 'confusion matrix'),
            '<h2>ROC and precision-recall</h2><div class="row">', embed_png(plots['roc'], 'ROC curves'),
            embed_png(plots['pr'], 'precision-recall curves'), '</div>',
            '<h2>Calibration</h2>', embed_png(plots['calibration'], 'reliability diagram')]
    if 'calibration' in values:
        c = values['calibration']
        body.append(table(['', 'ECE', 'NLL'], [['before', number(c['ece_before']), number(c['nll_before'])],
                                                [f'after (T = {c["temperature"]:.3f})', number(c['ece_after']),
                                                 number(c['nll_after'])]]))
    body += ['<h2>Training</h2>', embed_png(plots['training_curves'], 'training curves'),
             '<h2>Where the model looks</h2>', _gallery(entries, explanation)]
    if 'se_gates' in explanation:
        path, channels = plot_se_gates(explanation['se_gates'], os.path.join(directory, 'se_channels.png'))
        body += ['<h3>Squeeze-and-excitation channel weights</h3>', embed_png(path, 'SE channel weights'),
                 f'<p class="note">Most weighted channels (over the gallery images): '
                 f'{", ".join(map(str, channels))}.</p>']
    return write_page(os.path.join(directory, 'report.html'),
                      f'{config.model.name} on {config.data.name} — {split_name}', ''.join(body))
