"""MODEL_CARD.md of a bundle, written from its metadata.json's facts only, so the two never disagree.
It answers what the CLAIM 2024 and TRIPOD+AI checklists ask of a model: what the images are and
where they came from, who labelled them, the split, which checkpoint and decision rule, how it
scores, where it errs, what it must not be used for, its licence and how to cite it."""

from allflax.evaluation import stats


METRICS = (('accuracy', 'Accuracy'), ('balanced_accuracy', 'Balanced accuracy'), ('f1_macro', 'F1 (macro)'),
           ('roc_auc', 'ROC AUC (macro)'), ('cohen_kappa', "Cohen's kappa"), ('ece', 'ECE'))


def _number(value) -> str:
    return '–' if value is None else f'{value:.4f}'


def _interval(values: dict, name: str) -> str:
    return _pair(values.get('ci95', {}).get(name))


def _pair(interval) -> str:
    return f'{_number(interval[0])} – {_number(interval[1])}' if interval else '–'


def _metrics_table(values: dict) -> list[str]:
    lines = ['| Metric | Value | 95 % interval | Method |', '|---|---|---|---|']
    lines += [f'| {label} | {_number(values.get(name))} | {_interval(values, name)} | '
              f'{values.get("ci95_method", {}).get(name, "")} |'
              for name, label in METRICS if name in values]
    return lines


def _per_class_table(values: dict) -> list[str]:
    """Per class; with the exact intervals of recall (sensitivity) and specificity where they were computed."""
    exact = any('ci95' in c for c in values['per_class'].values())
    lines = ['| Class | Precision | Recall | F1 | Specificity | Support |'
             + (' Recall 95 % | Specificity 95 % | Method |' if exact else ''),
             '|---|---|---|---|---|---|' + ('---|---|---|' if exact else '')]
    for name, c in values['per_class'].items():
        line = (f'| {name} | {_number(c.get("precision"))} | {_number(c.get("recall"))} | {_number(c.get("f1"))} | '
                f'{_number(c.get("specificity"))} | {c.get("support", "–")} |')
        if exact:
            method = c.get('ci95_method', {})
            line += (f' {_interval(c, "recall")} | {_interval(c, "specificity")} | '
                     f'{method.get("recall", "")}; {method.get("specificity", "")} |')
        lines.append(line)
    return lines


# The data facts a card shows, in order: (metadata.json's data.facts key, row label).
FACT_ROWS = (('title', 'Data set'), ('specimen', 'Specimen'), ('stain', 'Stain'), ('acquisition', 'Acquisition'),
             ('magnification', 'Magnification'), ('microns_per_pixel', 'µm per pixel'), ('image_type', 'Images are'),
             ('patients', 'Patients (as published)'), ('images', 'Images (as published)'), ('sites', 'Sites'),
             ('labels', 'Labelled by, against'), ('source', 'Source'), ('licence', 'Licence'))


def fold_phrase(fold: dict | None) -> str:
    """'fold 2 of 5' (data.fold=2, folds numbered from 0), or '' for a run without k-fold."""
    return '' if fold is None else f'fold {fold["index"]} of {fold["count"]}'


def _split_sentence(data: dict) -> str:
    unit = 'patient' if data['split'] == 'patient' else 'image' if data['split'] == 'random' else data['split']
    if data.get('fold') is None:
        return f'Data set `{data["name"]}`{" (synthetic)" if data["synthetic"] else ""}, split by {data["split"]}:'
    return (f'Data set `{data["name"]}`{" (synthetic)" if data["synthetic"] else ""}, k-fold by {unit}: this model '
            f'is {fold_phrase(data["fold"])} (data.fold={data["fold"]["index"]}, folds numbered 0–'
            f'{data["fold"]["count"] - 1}). Its test split is that fold; train and val come from the other '
            f'{data["fold"]["count"] - 1} folds. The other folds are other runs, each with its own bundle:')


def _cell(text: str) -> str:
    """`text` in a Markdown table cell (a user's data.facts may hold a '|')."""
    return str(text).replace('|', '\\|')


def _facts_section(data: dict) -> list[str]:
    facts = data.get('facts')
    if not facts:
        return []
    lines = ['## What the images are and where they came from', '',
             '"unknown": not published; "(unconfirmed)": not confirmed from a primary source.', '',
             '| | |', '|---|---|']
    lines += [f'| {label} | {_cell(facts.get(key, "unknown"))} |' for key, label in FACT_ROWS]
    if data.get('variant'):
        lines += [f'| Variant used | {data["variant"]} |']
    lines += ['', *[f'- {note}' for note in facts.get('notes', [])]]
    if facts.get('fact_sources'):
        lines += ['', f'These facts were read from: {"; ".join(facts["fact_sources"])}.']
    return lines + ['']


def _checkpoint_line(metadata: dict) -> str:
    checkpoint = metadata.get('checkpoint')
    line = f'- Checkpoint: step {metadata["source"]["checkpoint_step"]} of the run `{metadata["source"]["workdir"]}`'
    if checkpoint is None:
        return line + '.'
    line += f', exported as {checkpoint["how"]}.'
    best = checkpoint.get('best_validation_step')
    if best is not None:
        same = ' (this one)' if best == checkpoint['step'] else ''
        line += f' Saved steps: {", ".join(map(str, checkpoint["saved_steps"]))}; the best by validation ' \
                f'accuracy is step {best}{same}.'
    return line


def training_line(training: dict | None) -> list[str]:
    """How the batch was taken, and what batch norm normalised over: a batch in micro-batches is the
    whole batch's update only without batch norm."""
    if training is None:
        return []
    k = training['micro_batches']
    taken = (f'{training["batch_size"]} images per step on {training["devices"]} device'
             f'{"" if training["devices"] == 1 else "s"}'
             + (f', as {k} micro-batches of {training["batch_size"] // k} (gradient accumulation)' if k > 1 else ''))
    if training['batch_norm_batch'] is None:
        return [f'- Training batch: {taken}; no batch norm.']
    return [f'- Training batch: {taken}; batch norm normalised by the statistics of {training["batch_norm_batch"]} '
            'images (one micro-batch, over all devices)'
            + (' and updated its running averages once per micro-batch: not the whole batch\'s update.' if k > 1
               else '.')]


def _repeated_runs_section(repeated: dict | None) -> list[str]:
    if repeated is None:
        return []
    methods = repeated['methods']
    lines = ['### Over the Monte Carlo re-splits', '',
             f'This model is iteration {repeated["iteration"]} of {repeated["iterations"]} re-splits (each with its '
             'own seed, split and training). The test scores over all of them:', '']
    for level, title in (('cell_level', 'per image'), ('patient_level', 'per patient')):
        if level not in repeated['metrics']:
            continue
        lines += [f'| Metric ({title}) | Mean | s.d. | Mean: corrected t 95 % (1) | Runs: percentile range (2) |',
                  '|---|---|---|---|---|']
        lines += [f'| {name} | {_number(v["mean"])} | {_number(v["std"])} | '
                  f'{_pair(v["corrected_t_interval_95"])} | {_pair(v["percentile_95"])} |'
                  for name, v in repeated['metrics'][level].items()]
        lines.append('')
    return lines + [f'(1) {methods["corrected_t_interval_95"]}: the re-splits share most of their data, so the plain '
                    f't-interval would be too narrow. (2) {methods["percentile_95"]}.', '']
def _input_convention_line(normalization: dict) -> str:
    """The input convention the model applies to its tiles (imagenet_mean_std in bundles that predate the record)."""
    line = (f'- Input convention: `{normalization.get("convention", "imagenet_mean_std")}`, applied inside the model: '
            f'{normalization["formula"]}, with mean {normalization["mean"]} and std {normalization["std"]}'
            + (f', scale {normalization["scale"]:.6g}' if 'scale' in normalization else ''))
    chosen_by = normalization.get('chosen_by')
    return line + (f'. Chosen by {chosen_by}.' if chosen_by else '.')


def decision_rule_line(rule: dict | None) -> str:
    if rule is None or rule['kind'] == 'argmax':
        return '- Decision rule: argmax, the class of highest probability; no threshold.'
    return (f'- Decision rule: a threshold of {rule["threshold"]:.4g} on the probability of '
            f'`{rule["positive_class"]}`: {rule["description"]}.')


def _confusion_table(cell: dict, classes: list[str]) -> list[str]:
    matrix = cell.get('confusion_matrix')
    if not matrix:
        return []
    lines = ['### Confusion matrix', '', 'Images; rows: true class, columns: predicted class.', '',
             '| True class | ' + ' | '.join(f'predicted {name}' for name in classes) + ' |',
             '|---' * (len(classes) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(str(count) for count in row) + ' |' for name, row in zip(classes, matrix)]
    return lines + ['']


def _image(file: str | None) -> str:
    return f'![{file}]({file})' if file else '–'


def _errors_section(errors: dict | None) -> list[str]:
    if errors is None:
        return []
    lines = ['### Most confident errors', '',
             f'{errors["errors"]} of {errors["images"]} test images are predicted wrong. '
             + (f'The {len(errors["shown"])} with the highest probability for the wrong class:' if errors['shown']
                else '')]
    if errors['shown']:
        lines += ['', '| Image | Patient | True | Predicted | Probability | Thumbnail |', '|---|---|---|---|---|---|']
        lines += [f'| `{e["image_id"]}` | {e["patient"] or "–"} | {e["label"]} | {e["predicted"]} | '
                  f'{e["probability"]:.3f} | {_image(e["thumbnail"])} |' for e in errors['shown']]
        lines += ['', f'Thumbnails: {errors["thumbnails"]}.']
    return lines


def _licence_section(metadata: dict) -> list[str]:
    licence, citation = metadata.get('licence'), metadata.get('citation')
    if licence is None and citation is None:
        return []
    lines = ['## Licence and citation', '']
    if licence:
        lines += [f'- Code: {licence["code"]}.', f'- Weights: {licence["weights"]}.']
    if citation:
        lines += [f'- Cite the software: {citation["software"]}; and the papers whose recipes it reproduces:',
                  *[f'  - {paper}' for paper in citation['papers']]]
        if citation.get('data'):
            lines += ['- Cite the data:', *[f'  - {entry}' for entry in citation['data']]]
    return lines + ['']


def _small_classes(evaluation: dict) -> str:
    """The sentence naming the classes with fewer than 3 test patients, or ''."""
    return stats.small_classes_sentence(evaluation.get('small_classes') or {})


def limitations(metadata: dict) -> list[str]:
    """Each limitation that applies to this bundle, in a sentence."""
    data, evaluation = metadata['data'], metadata['evaluation']
    found = ['No external validation: the test images come from the same data set (and its sources) as the '
             'training images; performance on other hospitals, stains, microscopes or cameras is unknown.']
    if data['synthetic']:
        found.insert(0, f'Trained and tested on synthetic images ({data["name"]}, generated by allflax): its '
                        'numbers say the pipeline works, nothing about real cells.')
    if evaluation is None:
        found.append('Not evaluated at the exported checkpoint: run `python main.py --mode=eval` on the run and '
                     'export again to record its test metrics.')
    else:
        cells = evaluation['cell_level']['num_examples']
        patients = data['splits'].get(evaluation['split'], {}).get('patients', 0)
        if cells < 1000 or patients < 30:
            found.append(f'A small test split ({cells} images, {patients} patients): the intervals are wide; '
                         'read them, not the point estimates.')
        if data.get('fold') is not None:
            found.append(f'One fold of a k-fold run ({fold_phrase(data["fold"])}): its scores are of this fold\'s '
                         f'test patients only; the cross-validated estimate is over all {data["fold"]["count"]} '
                         'folds\' runs.')
        if _small_classes(evaluation):
            found.append(_small_classes(evaluation))
        if evaluation['patient_level'] is None:
            found.append('No patient-level evaluation: the test images carry no patient identifiers, so the '
                         'intervals resample images, which understates their width when a patient has many.')
    independence = data.get('split_independence')
    if independence and independence['level'] == 'image':
        found.append(f'{independence["statement"][0].upper()}{independence["statement"][1:]}; this flatters the '
                     'test metrics.')
    elif data['split'] != 'patient':
        found.append(f'The split is by {data["split"]}, not by patient: cells of one patient may be in training '
                     'and test, which flatters the test metrics.')
    facts = data.get('facts') or {}
    unknown = [label.lower() for key, label in FACT_ROWS[1:7] if str(facts.get(key, 'unknown')).startswith('unknown')]
    if facts and unknown and not data['synthetic']:
        found.append(f'Not published for this data set: {", ".join(unknown)}; images that differ in them may not be '
                     'like the training images.')
    if metadata['probability_rule']['temperature_source'].startswith('none'):
        found.append('The probabilities are not calibrated by a fitted temperature.')
    found.append(f'Takes {metadata["input"]["size"]}-pixel tiles preprocessed exactly as its metadata.json says; '
                 'other preprocessing, magnifications or image types are outside what it was trained on.')
    return found


def render(metadata: dict) -> str:
    """The card as Markdown."""
    data, rule, evaluation = metadata['data'], metadata['probability_rule'], metadata['evaluation']
    lines = [f'# Model card: {metadata["model"]} ({", ".join(metadata["classes"])})'
             + (f', {fold_phrase(data["fold"])}' if data.get('fold') else ''), '',
             '## Intended use', '', metadata['intended_use'], '']
    if metadata.get('out_of_scope_uses'):
        lines += ['### Out of scope: do not use it for', '', *[f'- {use}' for use in metadata['out_of_scope_uses']],
                  '']
    lines += ['## Model', '',
              f'- Network: `{metadata["model"]}`; allflax {metadata["versions"]["allflax"]}, '
              f'JAX {metadata["versions"]["jax"]}, Flax {metadata["versions"]["flax"]}.',
              _checkpoint_line(metadata),
              f'- Input: {metadata["input"]["dtype"]} tiles of shape (batch, {metadata["input"]["size"]}, '
              f'{metadata["input"]["size"]}, {metadata["input"]["channels"]}), {metadata["input"]["color"]}, values '
              f'{metadata["input"]["value_range"][0]}–{metadata["input"]["value_range"][1]}.',
              _input_convention_line(metadata['preprocessing']['normalization']),
              f'- Output: {metadata["output"]["meaning"]}, classes in this order: '
              f'{", ".join(metadata["classes"])}.',
              f'- Probability rule: {rule["description"]} Temperature {rule["temperature"]:.4g} '
              f'({rule["temperature_source"]}).',
              decision_rule_line(metadata.get('decision_rule')), *training_line(metadata.get('training')), '',
              *_facts_section(data),
              '## Training data and split', '',
              _split_sentence(data), '',
              '| Split | Images | Patients | Images per class |', '|---|---|---|---|']
    lines += [f'| {name} | {split["images"]} | {split["patients"]} | '
              f'{", ".join(f"{c} {n}" for c, n in split["class_counts"].items())} |'
              for name, split in data['splits'].items()]
    if (data.get('split_independence') or {}).get('level') == 'image':
        lines += ['', f'**{data["split_independence"]["statement"]}.**']
    if data.get('skipped_images'):
        lines += ['', f'{data["skipped_images"]} unreadable images were skipped.']
    lines += ['', '## Evaluation', '']
    if evaluation is None:
        lines += ['Not evaluated at this checkpoint.']
    else:
        tta = ' with test-time augmentation (8 dihedral views)' if evaluation.get('test_time_augmentation') else ''
        cell = evaluation['cell_level']
        held_out = f'{fold_phrase(data["fold"])}; ' if data.get('fold') else ''
        lines += [f'The {evaluation["split"]} split ({held_out}{cell["num_examples"]} images), step '
                  f'{evaluation["checkpoint_step"]}{tta}. 95 % intervals, each with its method: bootstraps draw '
                  'whole patients (or images, without patient ids) within their class, so every resample holds '
                  'every class; proportions over independent units have exact (Clopper-Pearson) intervals.', '',
                  *([_small_classes(evaluation), ''] if _small_classes(evaluation) else []),
                  '### Per cell', '', *_metrics_table(cell), '', *_per_class_table(cell), '',
                  *_confusion_table(cell, metadata['classes'])]
        patient = evaluation['patient_level']
        if patient is not None:
            lines += ['### Per patient (mean probability of its cells)', '',
                      f'{patient["num_examples"]} patients.', '', *_metrics_table(patient), '',
                      *_per_class_table(patient), '']
        calibration = evaluation['calibration']
        lines += ['### Calibration', '', f'- Expected calibration error (15 bins): {_number(calibration["ece"])}.']
        if 'temperature' in calibration:
            lines += [f'- Temperature {calibration["temperature"]:.4g} fitted on {calibration.get("fitted_on", "val")}: '
                      f'ECE {_number(calibration.get("ece_before"))} before, {_number(calibration.get("ece_after"))} '
                      f'after.']
        diagram = evaluation.get('reliability_diagram')
        if diagram:
            lines += ['', f'Reliability of the {diagram["split"]} split\'s probabilities as the bundle gives them '
                          f'(`{diagram["file"]}`, {diagram["bins"]} bins):', '', _image(diagram['file'])]
        lines += ['', *_errors_section(evaluation.get('confident_errors'))]
    lines += ['', *_repeated_runs_section(metadata.get('repeated_runs'))]
    lines += ['', '## Limitations', '', *[f'- {line}' for line in limitations(metadata)], '',
              *_licence_section(metadata),
              '## How to run it', '',
              'This folder alone, with Python 3.11 or newer and the packages pinned in its `requirements.txt` '
              '(NumPy, OpenCV, ONNX Runtime): no checkout of allflax, no JAX. From any directory:', '',
              '```',
              'python -m venv venv && venv/bin/pip install -r THIS_FOLDER/requirements.txt',
              'venv/bin/python THIS_FOLDER/predict.py --input=cells/ --output=predictions.csv  # [--batch_size=32]',
              '```', '',
              '`predict.py` first checks the schema version and every file against the SHA-256 metadata.json holds '
              '(a changed or missing file is refused by name, and nothing is written), then preprocesses each image '
              'with the code training used (`preprocess.py`, `image_files.py`: allflax\'s own modules, copied at '
              'export) and writes one row per image (path, predicted_class, one probability per class, '
              'decision_rule); unreadable images go to `predictions.errors.csv`. In a checkout of allflax, '
              '`python -m allflax.deploy.bundle --bundle=THIS_FOLDER --input=cells/ --output=predictions.csv` runs the same '
              'predictor. Elsewhere, feed `model.onnx` the preprocessed uint8 tiles '
              f'(input `{metadata["input"]["name"]}`), or call `model.jax` with '
              '`jax.export.deserialize(open("model.jax", "rb").read()).call(tiles)` on '
              f'{", ".join(metadata["formats"]["stablehlo"]["platforms"])}.', '',
              *_int8_paragraph(metadata['formats'].get('onnx_int8'))]
    return '\n'.join(lines)


def _int8_paragraph(int8: dict | None) -> list[str]:
    """What the int8 model the predictor runs by default changed on the test split, if there is one."""
    if int8 is None:
        return []
    test = int8['test']
    return [f'`predict.py` runs `{int8["file"]}` by default, an int8 copy of `model.onnx` for CPUs '
            f'({int8["quantization"]}); `--precision=float32` runs `model.onnx`, the model whose metrics this card '
            f'gives. On the {test["test_images"]} test images, int8 gave accuracy {test["int8_accuracy"]:.4f} '
            f'against {test["float32_accuracy"]:.4f} ({test["accuracy_change_points"]:+.2f} points), the same class '
            f'for {100 * test["same_class"]:.1f} % of them, and probabilities within '
            f'{test["max_abs_probability_difference"]:.3g} of float32\'s (mean |Δp| '
            f'{test["mean_abs_probability_difference"]:.3g}).', '']
