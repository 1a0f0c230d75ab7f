"""End to end after tiny runs: metrics with intervals, the eval report, predict, compare, Monte Carlo.

One tiny VGG19+MHSA run is trained once for the module; the CLI is driven in-process
through main.py's flags (no new process, so compiled programs are reused).
"""
import copy
import csv
import json
import os
import shutil

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from absl import flags

import main
from allflax import sharding
from allflax.data import pipeline
from allflax.data.dataset import Dataset, Split
from allflax.evaluation import inference, report, results
from allflax.modes import compare, montecarlo
from allflax.training import loop, restore
from configs import common

PLOTS = ('confusion_matrix.png', 'roc.png', 'pr.png', 'calibration.png', 'training_curves.png')


def run_main(*args):
    """main.py with these flags (and defaults for the rest), in this process."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['main.py', *args])
    main.main(['main.py'])


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def tiny_run(make_tiny_config, tmp_path_factory):
    config = make_tiny_config()
    workdir = str(tmp_path_factory.mktemp('runs') / 'vgg19_mhsa')
    loop.train_and_evaluate(config, workdir)
    return config, workdir


def test_training_ends_with_intervals_patients_predictions_and_tensorboard(tiny_run):
    config, workdir = tiny_run
    with open(os.path.join(workdir, 'eval', 'test', 'metrics.json')) as f:
        values = json.load(f)
    for name in ('accuracy', 'balanced_accuracy', 'cohen_kappa', 'ece', 'nll', 'f1_macro', 'roc_auc'):
        assert name in values, name
    assert set(values['ci95']) == {'accuracy', 'f1_weighted', 'f1_macro', 'roc_auc'}
    for name, (low, high) in values['ci95'].items():
        assert low <= values[name] <= high, name
    assert values['bootstrap'] == {'samples': 1000, 'seed': 0, 'resampled': 'patients', 'within': 'class'}
    assert values['ci95_method']['f1_macro'] == ('stratified patient bootstrap (patients drawn within their class), '
                                                 '1000 resamples')
    with open(os.path.join(workdir, 'splits.json')) as f:
        test_patients = json.load(f)['test']['patients']
    patient = values['patient_level']
    assert patient['num_examples'] == len(test_patients)
    assert patient['ci95_method']['accuracy'] == f'Clopper-Pearson exact, {len(test_patients)} patients'
    right = round(patient['accuracy'] * len(test_patients))
    exact = scipy.stats.binomtest(right, len(test_patients)).proportion_ci(method='exact')
    assert patient['ci95']['accuracy'] == pytest.approx([exact.low, exact.high])
    assert set(values['small_classes']) <= set(values['class_names'])
    assert values['split_independence'] == {'method': 'patient', 'level': 'patient',
                                            'statement': "patient-level split: each patient's images are in one split"}
    rows = read_csv(os.path.join(workdir, 'eval', 'test', 'predictions.csv'))
    assert len(rows) == values['num_examples']
    class_names = values['class_names']
    assert all(abs(sum(float(r[c]) for c in class_names) - 1) < 1e-6 for r in rows)
    assert all(r['image_id'].startswith(f'test/{i}/sha1:') for i, r in enumerate(rows))
    accuracy = np.mean([r['label'] == r['predicted_class'] for r in rows])
    assert accuracy == pytest.approx(values['accuracy'])
    (events,) = os.listdir(os.path.join(workdir, 'tensorboard'))
    assert events.startswith('events.out.tfevents.')
    # Calibrated by default: a temperature fitted on val, stored with its step, ECE and NLL before and after.
    with open(os.path.join(workdir, 'eval', 'temperature.json')) as f:
        fitted = json.load(f)
    assert fitted['checkpoint_step'] == config.total_steps
    assert values['calibration']['temperature'] == fitted['temperature'] != 1.0
    assert values['calibration']['fitted_on'] == 'val' and values['calibration']['ece_after'] == values['ece']
    labels = np.array([class_names.index(r['label']) for r in rows])
    probabilities = np.array([[float(r[c]) for c in class_names] for r in rows])
    nll = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert values['calibration']['nll_after'] == pytest.approx(nll, rel=1e-5)
    with open(os.path.join(workdir, 'tensorboard', events), 'rb') as f:
        data = f.read()
    assert b'train/loss' in data and b'val/accuracy' in data and b'learning_rate' in data


def test_eval_mode_writes_the_report(tiny_run):
    config, workdir = tiny_run
    directory = os.path.join(workdir, 'eval', 'test')
    with open(os.path.join(directory, 'metrics.json')) as f:
        after_training = json.load(f)
    run_main('--mode=eval', f'--workdir={workdir}')
    with open(os.path.join(directory, 'metrics.json')) as f:
        assert json.load(f) == after_training  # The same numbers, whichever wrote them.
    for name in PLOTS:
        assert os.path.getsize(os.path.join(directory, name)) > 1000, name
    panels = sorted(os.listdir(os.path.join(directory, 'gradcam')))
    assert len(panels) == config.eval.gradcam_examples
    outcomes = {name.split('_')[1] for name in panels}
    assert outcomes == {'correct', 'wrong'} or after_training['accuracy'] in (0.0, 1.0)
    panel = cv2.imread(os.path.join(directory, 'gradcam', panels[0]))
    assert panel.shape == (160, 3 * 160, 3)  # Image, Grad-CAM and attention: vgg19_mhsa.
    with open(os.path.join(directory, 'report.html')) as f:
        page = f.read()
    # Self-contained: every image embedded (5 plots and one per panel), none linked.
    assert page.count('src="data:image/png;base64,') == len(PLOTS) + len(panels)
    assert 'src="http' not in page and 'src="/' not in page
    assert 'Balanced accuracy' in page and 'Cohen' in page and 'Patients' in page
    # At 32 px: block5_conv4's map is 2×2, the attention's (after block5_pool) 1×1.
    assert 'Grad-CAM at block5_conv4 (2×2' in page and 'self-attention received (1×1' in page
    assert f'Clopper-Pearson exact, {after_training["patient_level"]["num_examples"]} patients' in page
    assert 'stratified patient bootstrap (patients drawn within their class)' in page
    assert "<td>Split unit</td><td>patient-level split: each patient&#x27;s images are in one split</td>" in page
    assert 'class="warning">image-level' not in page
    for name in after_training['small_classes']:
        assert f'{name} ({after_training["small_classes"][name]} patient' in page


def test_eval_with_test_time_augmentation_and_temperature_scaling(tiny_run, tmp_path):
    config, workdir = copy.deepcopy(tiny_run[0]), tiny_run[1]
    with config.unlocked():
        config.eval.tta = True
        config.eval.temperature_scaling = True
        config.eval.bootstrap_samples = 100
    dataset = pipeline.load(config)
    restored = restore.restore(workdir, model=config.model, data=config.data,
                               dtype=config.dtype, seed=config.seed, num_classes=4)
    # One batch of each split, evaluated into another directory: the run's own files stay as they are.
    small = Dataset({name: Split(split.images[:8], split.labels[:8], split.patients[:8])
                     for name, split in dataset.splits.items()}, dataset.class_names)
    output = str(tmp_path / 'tta')
    values, predictions = results.evaluate_state(restored.eval_step, restored.state, small, 'test', restored.mesh,
                                                 output, options=config.eval, batch_size=config.batch_size,
                                                 seed=config.seed, split_method=config.data.split,
                                                 checkpoint_step=restored.step, input_convention='imagenet_mean_std')
    assert values['tta'] and predictions.logits.shape == (8, 8, 4)
    # The eight views of an image are the eight views of its mirror image: the same average.
    mirrored = Dataset({'test': Split(small.splits['test'].images[:, :, ::-1], small.splits['test'].labels,
                                      small.splits['test'].patients)}, dataset.class_names)
    logits = inference.predict_logits(restored.eval_step, restored.state, mirrored.splits['test'], 8,
                                      restored.mesh, tta=True)
    np.testing.assert_allclose(np.sort(logits, axis=1), np.sort(predictions.logits, axis=1), rtol=1e-4, atol=1e-5)
    calibration = values['calibration']
    assert calibration['temperature'] == predictions.temperature > 0
    with open(os.path.join(output, 'eval', 'temperature.json')) as f:
        assert json.load(f) == {'temperature': calibration['temperature'], 'checkpoint_step': 6}
    assert os.path.exists(os.path.join(output, 'eval', 'test', 'predictions.csv'))


@pytest.mark.parametrize('patients, method, level', [(['a', 'b', 'c', 'd'], 'patient', 'patient'),
                                                      (['', '', '', ''], 'patient', 'image'),
                                                      (['a', 'b', 'c', 'd'], 'random', 'image')])
def test_metrics_json_says_whether_the_split_is_patient_independent(tmp_path, patients, method, level):
    split = Split(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]), np.array(patients))
    dataset = Dataset({'test': split, 'val': split}, ('x', 'y', 'z'))
    config = common.eval_config()
    with config.unlocked():
        config.bootstrap_samples = 20
    results.evaluate_state(lambda state, x: jnp.tile(jnp.array([[1.0, 0.0, -1.0]]), (x.shape[0], 1)), None, dataset,
                           'test', sharding.make_mesh(), str(tmp_path), options=config, batch_size=4, seed=0,
                           split_method=method, checkpoint_step=1, input_convention='imagenet_mean_std')
    with open(tmp_path / 'eval' / 'test' / 'metrics.json') as f:
        written = json.load(f)['split_independence']
    assert (written['method'], written['level']) == (method, level)
    assert written['statement'].startswith('image-level split: not patient-independent' if level == 'image'
                                           else 'patient-level split')
    warning = report.split_warning({'split_independence': written})  # The report's banner.
    assert (warning == '') == (level == 'patient')
    assert level == 'patient' or warning.startswith('<p class="warning">image-level split: not patient-independent: ')


def _write_images(folder, tiles):
    os.makedirs(folder)
    for i, tile in enumerate(tiles):
        cv2.imwrite(os.path.join(folder, f'cell_{i}.png'), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
    # A larger, non-square copy: resized and padded like the training tiles.
    cv2.imwrite(os.path.join(folder, 'wide.jpg'), cv2.resize(tiles[0], (64, 40)))
    with open(os.path.join(folder, 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\nnot really an image')
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:
        f.write('not an image: not listed')


def test_predict_folder_with_a_corrupt_file(tiny_run, tmp_path, capsys):
    config, workdir = tiny_run
    test_split = pipeline.load(config).splits['test']
    folder = str(tmp_path / 'cells')
    _write_images(folder, [test_split.images[i] for i in range(3)])
    output = str(tmp_path / 'out' / 'preds.csv')
    os.makedirs(os.path.dirname(output))
    run_main('--mode=predict', f'--workdir={workdir}', f'--input={folder}',
             f'--output={output}', '--gradcam')
    rows = read_csv(output)
    class_names = list(rows[0])[2:-1]
    assert list(rows[0])[:2] == ['path', 'predicted_class'] and len(class_names) == 4
    assert list(rows[0])[-1] == 'decision_rule' and {r['decision_rule'] for r in rows} == {'argmax'}
    assert sorted(os.path.basename(r['path']) for r in rows) == ['cell_0.png', 'cell_1.png', 'cell_2.png', 'wide.jpg']
    for row in rows:
        probabilities = [float(row[c]) for c in class_names]
        assert sum(probabilities) == pytest.approx(1, abs=1e-6)
        assert row['predicted_class'] == class_names[int(np.argmax(probabilities))]
    # Lossless tiles of the training size predict exactly as evaluation did: one prediction path.
    evaluated = read_csv(os.path.join(workdir, 'eval', 'test', 'predictions.csv'))
    for row in rows[:3]:
        index = int(os.path.basename(row['path'])[5])
        np.testing.assert_allclose([float(row[c]) for c in class_names],
                                   [float(evaluated[index][c]) for c in class_names], atol=1e-6)
    errors = read_csv(str(tmp_path / 'out' / 'preds.errors.csv'))
    assert [os.path.basename(e['path']) for e in errors] == ['broken.png'] and errors[0]['reason']
    assert 'broken.png' in capsys.readouterr().err
    assert len(os.listdir(str(tmp_path / 'out' / 'preds_gradcam'))) == 4


def test_compare_two_runs_and_refuse_different_images(tiny_run, make_tiny_config, tmp_path):
    _, workdir_a = tiny_run
    config = make_tiny_config()
    with config.unlocked():
        config.model.name = 'vgg19'
        config.model.options = {}  # No attention block or pooled head: Keras's VGG19 top.
        config.eval.bootstrap_samples = 200
    workdir_b = str(tmp_path / 'vgg19')
    loop.train_and_evaluate(config, workdir_b)
    output_dir = str(tmp_path / 'comparison')
    run_main('--mode=compare', f'--workdirs={workdir_a},{workdir_b}', f'--output_dir={output_dir}')
    with open(os.path.join(output_dir, 'compare.json')) as f:
        result = json.load(f)
    a, b = (compare.read_predictions(w, 'test') for w in (workdir_a, workdir_b))
    correct_a, correct_b = (r.probabilities.argmax(1) == r.labels for r in (a, b))
    assert result['mcnemar']['only_a_correct'] == int(np.sum(correct_a & ~correct_b))
    assert result['mcnemar']['only_b_correct'] == int(np.sum(correct_b & ~correct_a))
    assert 0 < result['mcnemar']['p_value'] <= 1
    difference = result['difference_a_minus_b']['accuracy']
    assert difference['difference'] == pytest.approx(correct_a.mean() - correct_b.mean())
    assert difference['ci95'][0] <= difference['difference'] <= difference['ci95'][1]
    assert difference['ci95_method'] == ('paired stratified patient bootstrap (patients drawn within their class), '
                                         '1000 resamples')
    assert os.path.exists(os.path.join(output_dir, 'compare.html'))

    other = tmp_path / 'other'
    shutil.copytree(os.path.join(workdir_b, 'eval'), str(other / 'eval'))
    path = str(other / 'eval' / 'test' / 'predictions.csv')
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:
        f.write(text.replace('test/0/sha1:', 'test/0/sha1:0', 1))
    with pytest.raises(ValueError, match='different images'):
        compare.compare([workdir_a, str(other)], 'test', output_dir)


def test_montecarlo_completes_and_resumes(make_tiny_config, tmp_path, monkeypatch):
    config = make_tiny_config()
    with config.unlocked():
        config.montecarlo.iterations = 2
        config.eval.bootstrap_samples = 100
        config.eval_every_steps = config.checkpoint_every_steps = 6  # Once, at the end.
    workdir = str(tmp_path / 'mc_run')
    summary = montecarlo.run(config, workdir)
    assert summary['iterations'] == 2 and summary['seeds'] == [0, 1]
    accuracy = summary['metrics']['accuracy']
    assert accuracy['n'] == 2 and accuracy['mean'] == pytest.approx(np.mean(summary['per_iteration']['accuracy']))
    # The corrected resampled t-interval over patients, from the iterations' own splits.json.
    with open(os.path.join(workdir, 'mc', '0', 'splits.json')) as f:
        sizes = json.load(f)
    n_test, n_train = len(sizes['test']['patients']), len(sizes['train']['patients'])
    assert summary['methods']['unit'] == 'patients' and (summary['methods']['n_test'], summary['methods']['n_train']) \
        == (n_test, n_train)
    runs = summary['per_iteration']['accuracy']
    half = scipy.stats.t.ppf(0.975, 1) * np.sqrt((1 / 2 + n_test / n_train) * np.var(runs, ddof=1))
    assert accuracy['corrected_t_interval_95'] == pytest.approx([np.mean(runs) - half, np.mean(runs) + half])
    assert 'patient_level' in summary['metrics']
    assert os.path.getsize(os.path.join(workdir, 'montecarlo.png')) > 1000
    with open(os.path.join(workdir, 'montecarlo.html')) as f:
        page = f.read()
    assert 'Nadeau and Bengio' in page and 'percentile range' in page and 'data:image/png' in page
    with open(os.path.join(workdir, 'mc', '1', 'config.json')) as f:
        saved = json.load(f)
    assert saved['seed'] == 1  # VGG19+MHSA has no batch norm; one device takes the batch of 8 at once.
    assert saved['derived'] == {'devices': 1, 'device_batch': 8, 'micro_batches': 1, 'batch_norm_batch': None}

    calls = []
    original = loop.train_and_evaluate

    def counting(config, workdir):
        calls.append(workdir)
        return original(config, workdir)

    monkeypatch.setattr(loop, 'train_and_evaluate', counting)
    assert montecarlo.run(config, workdir) == summary and calls == []  # Done iterations are read back.
    # An iteration interrupted after its last checkpoint resumes there: no step is trained again.
    os.remove(os.path.join(workdir, 'mc', '1', 'eval', 'test', 'metrics.json'))
    with open(os.path.join(workdir, 'mc', '1', 'metrics.jsonl')) as f:
        logged = f.read()
    assert montecarlo.run(config, workdir) == summary and calls == [os.path.join(workdir, 'mc', '1')]
    with open(os.path.join(workdir, 'mc', '1', 'metrics.jsonl')) as f:
        assert f.read() == logged
