"""The evaluation report: one self-contained HTML page per split (plots embedded), each plot also
saved beside it, and the Grad-CAM gallery."""
import html
import os
from collections.abc import Callable

import numpy as np

from allflax import files
from allflax.data.dataset import Split
from allflax.evaluation import calibration, interpret, operating_point, plots, results, stats
from allflax.evaluation.html import embed_png, interval, number, table, write_page

# Metric keys of metrics.json, as the report names them.
SUMMARY_METRICS = {
    'accuracy': 'Accuracy', 'balanced_accuracy': 'Balanced accuracy (mean recall)',
    'f1_weighted': 'F1, weighted by class size', 'f1_macro': 'F1, mean over classes',
    'precision_macro': 'Precision, mean over classes', 'recall_macro': 'Recall (sensitivity), mean over classes',
    'specificity_macro': 'Specificity, mean over classes', 'roc_auc': 'ROC-AUC, mean over classes',
    'cohen_kappa': "Cohen's kappa", 'ece': 'Expected calibration error (lower is better)',
    'nll': 'Negative log-likelihood (lower is better)'}


class _Methods:
    """Numbers each distinct interval method, so that a table can show it beside each interval
    as (1), (2), ... and list the methods below."""

    def __init__(self):
        self.names: list[str] = []

    def interval(self, values: dict, name: str) -> str:
        bounds = values.get('ci95', {}).get(name)
        method = values.get('ci95_method', {}).get(name)
        if method is None:
            return interval(bounds) if name in values.get('ci95', {}) else ''
        if method not in self.names:
            self.names.append(method)
        return f'{interval(bounds)} ({self.names.index(method) + 1})'

    def legend(self) -> str:
        return ('<p class="note">95 % intervals: ' + '; '.join(
            f'({i}) {html.escape(name)}' for i, name in enumerate(self.names, 1)) + '.</p>') if self.names else ''


def _metrics_tables(values: dict) -> str:
    patient = values.get('patient_level')
    methods = _Methods()
    header = ['Metric', 'Images', '95 % interval'] + (['Patients', '95 % interval'] if patient else [])
    rows = []
    for name, label in SUMMARY_METRICS.items():
        row = [label, number(values[name]), methods.interval(values, name)]
        if patient:
            row += [number(patient[name]), methods.interval(patient, name)]
        rows.append(row)
    per_class = [[name, number(c['precision']), number(c['recall']), number(c['f1']),
                  number(c['specificity']), number(c['roc_auc']), c['support']]
                 for name, c in values['per_class'].items()]
    # Exact intervals of sensitivity and specificity: over patients where known, else over images.
    exact, units = (patient, 'Patients') if patient else (values, 'Images')
    sensitivity = [[name, number(c['recall']), methods.interval(c, 'recall'), number(c['specificity']),
                    methods.interval(c, 'specificity'), c['support']]
                   for name, c in exact['per_class'].items() if 'ci95' in c]
    return (table(header, rows)
            + '<h3>Per class (images)</h3>'
            + table(['Class', 'Precision', 'Recall', 'F1', 'Specificity', 'ROC-AUC', 'Images'], per_class)
            + (f'<h3>Sensitivity and specificity per class ({units.lower()})</h3>'
               + table(['Class', 'Sensitivity', '95 % interval', 'Specificity', '95 % interval', units], sensitivity)
               if sensitivity else '')
            + methods.legend())


def _small_classes(values: dict) -> str:
    sentence = stats.small_classes_sentence(values.get('small_classes') or {})
    return f'<p class="warning">{html.escape(sentence)}</p>' if sentence else ''


def split_warning(values: dict) -> str:
    """The warning of a split that patients do not bound (metrics.json's `split_independence`), or ''."""
    independence = values.get('split_independence') or {}
    if independence.get('level') != 'image':
        return ''
    return f'<p class="warning">{html.escape(independence["statement"])}.</p>'


def _gallery(entries: list[dict], explanation: dict) -> str:
    if not entries:
        return '<p class="note">No images to show.</p>'
    height, width = explanation['gradcam'].shape[2:]
    columns = f'image · Grad-CAM at {explanation["gradcam_layer"]} ({height}×{width}, scaled to its maximum)'
    if 'attention' in explanation:
        size = '×'.join(map(str, explanation['attention'].shape[1:]))
        columns += (f' · self-attention received ({size}, mean over heads and queries, scaled from its '
                    f'minimum to its maximum: each sums to 1 over the positions)')
    figures = ''.join(
        f'<figure class="{"" if e["correct"] else "wrong"}">{embed_png(e["path"], e["caption"], "panel")}'
        f'<figcaption>{html.escape(e["caption"])}</figcaption></figure>' for e in entries)
    return (f'<p class="note">Each panel: {html.escape(columns)}. Grad-CAM explains the class the caption '
            f'names (with test-time augmentation, that of the averaged views; the maps are of the image '
            f'as shown). Green: correct, red: wrong; (p) is the predicted probability. Maps are '
            f'upsampled, each scaled on its own (so a map says where, not how much).</p>'
            f'<div class="gallery">{figures}</div>')


def write_gallery(directory: str, split: Split, class_names, probabilities: np.ndarray,
                  explain: Callable[[Split], dict], *, count: int, preprocess) -> tuple[list[dict], dict]:
    """Grad-CAM (and attention) panels of `count` chosen images into `directory/gradcam/`, each for
    the class of `probabilities` (the model's final ones, averaged over the views with test-time
    augmentation); `explain(split)` explains a split's images (`restore.explainer`), `preprocess`
    names the tiles' preprocessing (to show them in RGB). Returns the gallery entries and the
    raw explanation."""
    indices = interpret.select_examples(split.labels, probabilities, count)
    if not len(indices):
        return [], {}
    chosen = Split(np.stack([split.images[i] for i in indices]), split.labels[indices], split.patients[indices])
    explanation = explain(chosen)
    predicted = probabilities[indices].argmax(axis=1)
    correct = predicted == split.labels[indices]
    names = [interpret.example_name(rank, class_names[t], class_names[p])
             for rank, (t, p) in enumerate(zip(split.labels[indices], predicted))]
    images = [interpret.display_rgb(image, preprocess) for image in chosen.images]
    paths = interpret.write_panels(os.path.join(directory, 'gradcam'), images, explanation, predicted, names)
    entries = [{'path': path, 'correct': bool(c),
                'caption': f'#{i}: true {class_names[t]}, predicted {class_names[p]} '
                           f'({probabilities[i, p]:.2f})'}
               for path, i, t, p, c in zip(paths, indices, split.labels[indices], predicted, correct)]
    return entries, explanation


def write_split_report(workdir: str, split_name: str, split: Split, class_names, values: dict,
                       predictions: results.SplitPredictions, explain: Callable[[Split], dict], *,
                       model_name: str, data_name: str, preprocess, gradcam_examples: int) -> str:
    """Writes the plots, the Grad-CAM gallery and report.html into `workdir/eval/<split>/`."""
    directory = results.split_directory(workdir, split_name)
    labels, probabilities = split.labels, predictions.probabilities
    # Every process runs the jitted Grad-CAM; only the first writes files.
    entries, explanation = write_gallery(directory, split, class_names, probabilities, explain,
                                         count=gradcam_examples, preprocess=preprocess)
    if not files.is_writer():
        return ''
    figures = {
        'confusion_matrix': plots.plot_confusion_matrix(values['confusion_matrix'], class_names,
                                                        os.path.join(directory, 'confusion_matrix.png')),
        'roc': plots.plot_one_vs_rest(labels, probabilities, class_names, os.path.join(directory, 'roc.png'), 'roc'),
        'pr': plots.plot_one_vs_rest(labels, probabilities, class_names, os.path.join(directory, 'pr.png'), 'pr'),
    }
    curves = {'model': probabilities}
    if predictions.temperature != 1.0:
        curves = {'before scaling': calibration.probabilities(predictions.logits),
                  f'T = {predictions.temperature:.2f}': probabilities}
    figures['calibration'] = plots.plot_calibration(labels, curves, os.path.join(directory, 'calibration.png'))
    point = values.get('operating_point')
    if point:
        positive = list(class_names).index(point['positive_class'])
        band = operating_point.roc_band(labels, probabilities[:, positive], positive, split.patients,
                                        samples=values['bootstrap']['samples'], seed=values['bootstrap']['seed'])
        figures['operating_point'] = plots.plot_operating_point(labels, probabilities[:, positive], positive, band,
                                                                point, os.path.join(directory, 'operating_point.png'))
    figures['training_curves'] = plots.plot_training_curves(
        plots.read_training_log(os.path.join(workdir, 'metrics.jsonl')),
        os.path.join(directory, 'training_curves.png'))

    patients = stats.known_patients(split.patients)
    facts = [['Run', os.path.abspath(workdir)], ['Model', model_name],
             ['Data', data_name], ['Split', f'{split_name}: {len(split)} images'
                                          + (f', {len(np.unique(patients))} patients' if patients is not None else '')],
             ['Checkpoint step', values['checkpoint_step']],
             ['Input convention', values['input_convention']],
             ['Test-time augmentation', '8 dihedral views' if values['tta'] else 'off'],
             ['Temperature scaling', f'T = {predictions.temperature:.3f} (fitted on val)'
              if 'calibration' in values else 'off']]
    independence = values.get('split_independence')
    if independence:
        facts.insert(4, ['Split unit', independence['statement']])
    body = [table(None, facts), split_warning(values),
            '<h2>Metrics</h2>', _small_classes(values), _metrics_tables(values),
            '<p class="note">The bootstraps are percentile intervals; they draw whole patients where known (their '
            'cells are not independent) within each class, so every resample holds every class. Proportions over '
            'independent units (patients, or images without patient ids) have exact Clopper-Pearson intervals. '
            'Patient-level scores use the mean of each patient\'s cell probabilities. '
            'ECE: expected calibration error, 15 bins. NLL: mean negative log-likelihood.</p>',
            '<h2>Confusion matrix</h2>', embed_png(figures['confusion_matrix'], 'confusion matrix'),
            '<h2>ROC and precision-recall</h2><div class="row">', embed_png(figures['roc'], 'ROC curves'),
            embed_png(figures['pr'], 'precision-recall curves'), '</div>',
            '<h2>Calibration</h2>', embed_png(figures['calibration'], 'reliability diagram')]
    if 'calibration' in values:
        c = values['calibration']
        body.append(table(['', 'ECE', 'NLL'], [['before', number(c['ece_before']), number(c['nll_before'])],
                                                [f'after (T = {c["temperature"]:.3f})', number(c['ece_after']),
                                                 number(c['nll_after'])]]))
    if point:
        rates = [[name, number(point[name]), interval(point['ci95'][name])] for name in operating_point.RATES]
        body += ['<h2>Operating point</h2>',
                 f'<p>{html.escape(point["positive_class"])} where its probability is at least '
                 f'{point["threshold"]:.4g}: the threshold chosen on the validation split for sensitivity '
                 f'&ge; {point["target_sensitivity"]:g} (reached {point["val_sensitivity"]:.3f} there).</p>',
                 table(['At the threshold', 'Value', '95 % interval'], rates),
                 f'<p class="note">Intervals: {html.escape(point["ci95_method"])}. The band around the ROC '
                 f'curve: the same resamples.</p>', embed_png(figures['operating_point'], 'ROC with its band')]
    body += ['<h2>Training</h2>', embed_png(figures['training_curves'], 'training curves'),
             '<h2>Where the model looks</h2>', _gallery(entries, explanation)]
    if 'se_gates' in explanation:
        path, channels = plots.plot_se_gates(explanation['se_gates'], os.path.join(directory, 'se_channels.png'))
        body += ['<h3>Squeeze-and-excitation channel weights</h3>', embed_png(path, 'SE channel weights'),
                 f'<p class="note">Most weighted channels (over the gallery images): '
                 f'{", ".join(map(str, channels))}.</p>']
    return write_page(os.path.join(directory, 'report.html'),
                      f'{model_name} on {data_name} — {split_name}', ''.join(body))
