"""--mode=export's bundle against the checkpoint it came from, and `python -m allflax.bundle` without JAX."""
import csv
import json
import os
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from absl import flags

import main
from allflax import bundle, export, files, predict, train
from allflax.data import pipeline
from allflax.training import restore
from configs import efficientnetv2_b3_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ('jax', 'jaxlib', 'flax', 'orbax', 'grain', 'tensorflow')


def tiny_b3_config(cache_dir):
    """EfficientNetV2-B3+SE at 32 px for 2 steps: its batch statistics move off their initial values."""
    config = efficientnetv2_b3_se.get_config('demo')
    with config.unlocked():
        config.data.image_size = 32
        config.data.num_images = 96
        config.data.num_patients = 12
        config.data.cache_dir = cache_dir
        config.batch_size = 8
        config.total_steps = 2
        config.log_every_steps = 2
        config.eval_every_steps = 2
        config.checkpoint_every_steps = 2
        config.eval.bootstrap_samples = 20
    return config


def train_and_export(config, folder):
    workdir, output = str(folder / 'run'), str(folder / 'bundle')
    train.train_and_evaluate(config, workdir)
    return config, workdir, output, export.export(config, workdir, output)


@pytest.fixture(scope='module')
def vgg_bundle(make_tiny_config, tmp_path_factory):
    """A tiny trained VGG19+MHSA run, evaluated with test-time augmentation and a fitted
    temperature (so the bundle carries both), and its bundle."""
    config = make_tiny_config()
    with config.unlocked():
        config.eval.tta = True
        config.eval.temperature_scaling = True
        config.eval.bootstrap_samples = 20
    return train_and_export(config, tmp_path_factory.mktemp('vgg19_mhsa'))


@pytest.fixture(scope='module')
def b3_bundle(synthetic_cache, tmp_path_factory):
    """A tiny trained EfficientNetV2-B3+SE run and its bundle."""
    return train_and_export(tiny_b3_config(synthetic_cache), tmp_path_factory.mktemp('efficientnetv2_b3_se'))


def evaluated_probabilities(workdir, class_names):
    """The checkpoint's JAX probabilities of the test split, as training's evaluation wrote them."""
    with open(os.path.join(workdir, 'eval', 'test', 'predictions.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(row[name]) for name in class_names] for row in rows])


@pytest.mark.parametrize('recipe', ['vgg_bundle', 'b3_bundle'])
def test_bundle_predicts_as_the_checkpoint(recipe, request):
    config, workdir, output, summary = request.getfixturevalue(recipe)
    metadata = bundle.read_metadata(output)
    assert set(metadata['files']) == {'model.onnx', 'model.onnx.data', 'model.jax', 'MODEL_CARD.md'}
    assert set(summary['bytes']) == {*metadata['files'], 'metadata.json'}
    assert summary['onnx_max_abs_probability_difference'] <= 1e-4  # Checked by the export itself.
    class_names = restore.run_summary(workdir)['class_names']
    test = pipeline.load(config).splits['test']
    reference = evaluated_probabilities(workdir, class_names)

    predictor = bundle.Predictor(output)
    onnx = predictor.probabilities(test.images, batch_size=7)  # Batches of 7 and a last of another size.
    assert onnx.dtype == np.float32 and np.abs(onnx - reference).max() <= 1e-4
    np.testing.assert_array_equal(onnx.argmax(1), reference.argmax(1))
    # One image alone as in a batch: batch norm runs on its running statistics.
    np.testing.assert_allclose(predictor.probabilities(test.images[-1:])[0], onnx[-1], atol=1e-6)

    with open(os.path.join(output, 'model.jax'), 'rb') as f:
        stablehlo = jax.export.deserialize(bytearray(f.read()))
    assert set(stablehlo.platforms) == {'cpu', 'cuda', 'tpu'}
    assert np.abs(np.asarray(stablehlo.call(test.images[:5])) - reference[:5]).max() <= 1e-5

    with open(os.path.join(workdir, 'eval', 'test', 'metrics.json')) as f:
        evaluated = json.load(f)
    assert float(np.mean(onnx.argmax(1) == test.labels)) == evaluated['accuracy']
    assert metadata['evaluation']['cell_level']['accuracy'] == evaluated['accuracy']
    assert metadata['source']['checkpoint_step'] == evaluated['checkpoint_step'] == config.total_steps
    assert metadata['probability_rule']['test_time_augmentation'] == config.eval.tta
    if config.eval.temperature_scaling:
        with open(os.path.join(workdir, 'eval', 'temperature.json')) as f:
            assert metadata['probability_rule']['temperature'] == json.load(f)['temperature'] != 1.0
    assert metadata['preprocessing']['normalization']['mean'] == list(config.data.mean)
    assert metadata['classes'] == list(class_names)
    splits = metadata['data']['splits']
    assert splits['test'] == {'images': len(test), 'patients': len(set(test.patients)),
                              'class_counts': splits['test']['class_counts']}
    card = open(os.path.join(output, 'MODEL_CARD.md')).read()
    assert 'Not a medical device' in card and 'synthetic images' in card and 'No external validation' in card
    assert f'{evaluated["accuracy"]:.4f}' in card and 'Per patient' in card
    # Each interval's method beside it; the classes with fewer than 3 test patients named.
    assert f'| Clopper-Pearson exact, {len(set(test.patients))} patients |' in card
    assert metadata['evaluation'].get('small_classes') == evaluated['small_classes']
    assert 'small_classes' not in metadata['evaluation']['cell_level']
    for name, patients in evaluated['small_classes'].items():
        assert f'{name} ({patients} patient' in card


def write_cells(folder, rng):
    """Cells of assorted sizes, a grey one, an RGBA one, and a file that is no image."""
    os.makedirs(folder)
    for i, (height, width) in enumerate([(40, 52), (70, 33), (32, 32), (90, 90)]):
        cv2.imwrite(os.path.join(folder, f'cell{i}.png'), rng.integers(0, 256, (height, width, 3), np.uint8))
    cv2.imwrite(os.path.join(folder, 'grey.png'), rng.integers(0, 256, (28, 30), np.uint8))
    cv2.imwrite(os.path.join(folder, 'rgba.png'), rng.integers(0, 256, (36, 36, 4), np.uint8))
    with open(os.path.join(folder, 'broken.png'), 'wb') as f:
        f.write(b'not an image')


def run_bundle_cli(*args):
    """`python -m allflax.bundle ...` in a fresh process; returns (the run, the forbidden modules it imported)."""
    script = ('import json, sys\nfrom allflax import bundle\ntry:\n    bundle.main(sys.argv[1:])\nfinally:\n'
              f'    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})), '
              'file=sys.stderr)\n')
    run = subprocess.run([sys.executable, '-c', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    *lines, imported = run.stderr.splitlines()
    return run, lines, json.loads(imported)


def test_bundle_cli_predicts_as_predict_mode_without_jax(vgg_bundle, tmp_path):
    config, workdir, output, _ = vgg_bundle
    cells = str(tmp_path / 'cells')
    write_cells(cells, np.random.default_rng(0))
    run, lines, imported = run_bundle_cli(f'--bundle={output}', f'--input={cells}',
                                          f'--output={tmp_path / "bundle.csv"}')
    assert run.returncode == 0, run.stderr
    assert imported == []
    assert lines == [f'unreadable: {cells}/broken.png: not a decodable image (truncated, corrupt or not an image)']
    predict.predict(config, workdir, cells, str(tmp_path / 'predict.csv'))
    for suffix in ('.csv', '.errors.csv'):
        with open(tmp_path / f'bundle{suffix}') as f:
            from_bundle = f.read().splitlines()
        with open(tmp_path / f'predict{suffix}') as f:
            from_predict = f.read().splitlines()
        assert len(from_bundle) == len(from_predict) == (7 if suffix == '.csv' else 2)
        assert from_bundle[0] == from_predict[0]  # The same columns.
        for row_bundle, row_predict in zip(from_bundle[1:], from_predict[1:]):
            path_b, class_b, *p_b = row_bundle.split(',')
            path_p, class_p, *p_p = row_predict.split(',')
            assert (path_b, class_b) == (path_p, class_p)
            if suffix == '.csv':
                np.testing.assert_allclose(np.float64(p_b), np.float64(p_p), atol=1e-4)


def tree(folder):
    return sorted((root, tuple(sorted(names)), tuple(sorted(dirs))) for root, dirs, names in os.walk(folder))


def test_export_refusals_are_one_line_and_write_nothing(vgg_bundle, tmp_path, capsys):
    config, workdir, output, _ = vgg_bundle
    untrained = tmp_path / 'untrained'
    untrained.mkdir()
    for name in ('config.json', 'splits.json'):
        shutil.copy(os.path.join(workdir, name), untrained / name)
    not_a_bundle = tmp_path / 'notes'
    not_a_bundle.mkdir()
    (not_a_bundle / 'notes.txt').write_text('mine')
    before = tree(tmp_path), tree(workdir)
    for args, message in [
        ([f'--workdir={untrained}', f'--output={tmp_path / "new"}'], f'no checkpoint in {untrained}/checkpoints'),
        ([f'--workdir={workdir}', f'--output={not_a_bundle}'], f'{not_a_bundle} exists and is not a bundle'),
    ]:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(['main.py', '--mode=export', *args])
        with pytest.raises(SystemExit) as exit_info:
            main.main(['main.py'])
        assert exit_info.value.code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert (tree(tmp_path), tree(workdir)) == before


def test_a_bundle_refuses_changed_files_versions_and_tiles(vgg_bundle, tmp_path):
    config, _, output, _ = vgg_bundle
    copy = str(tmp_path / 'copy')
    shutil.copytree(output, copy)
    with open(os.path.join(copy, 'model.onnx.data'), 'r+b') as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    cells = str(tmp_path / 'cells')
    write_cells(cells, np.random.default_rng(1))
    before = tree(tmp_path)
    run, lines, imported = run_bundle_cli(f'--bundle={copy}', f'--input={cells}', f'--output={tmp_path / "p.csv"}')
    assert run.returncode == 1 and imported == []
    assert lines == [f'error: {copy}/model.onnx.data has changed since export: its SHA-256 is not the one '
                     'metadata.json holds; export the bundle again']
    assert tree(tmp_path) == before

    os.remove(os.path.join(copy, 'MODEL_CARD.md'))
    with pytest.raises(bundle.BundleError, match=f'{copy}/MODEL_CARD.md is missing from the bundle'):
        bundle.read_metadata(copy)
    with open(os.path.join(output, 'metadata.json')) as f:
        metadata = json.load(f)
    with open(os.path.join(copy, 'metadata.json'), 'w') as f:
        json.dump(dict(metadata, schema_version=2), f)
    with pytest.raises(bundle.BundleError, match='schema version 2 is not one this allflax reads'):
        bundle.read_metadata(copy)
    with pytest.raises(bundle.BundleError, match="not a valid bundle metadata.json at input/dtype"):
        bundle.validate(dict(metadata, input=dict(metadata['input'], dtype='float64')), 'metadata.json')

    predictor = bundle.Predictor(output)
    size = config.data.image_size
    for tiles in (np.zeros((2, size + 1, size, 3), np.uint8), np.zeros((2, size, size, 1), np.uint8),
                  np.zeros((2, size, size, 3), np.float32)):
        with pytest.raises(bundle.BundleError, match=rf'takes uint8 tiles of shape \(N, {size}, {size}, 3\)'):
            predictor.probabilities(tiles)


def test_export_replaces_only_its_own_bundle(vgg_bundle, tmp_path):
    """A bundle export wrote is replaced; any other folder, or one that holds more than a bundle, is
    refused before anything is written."""
    _, workdir, output, _ = vgg_bundle
    own = str(tmp_path / 'own')
    shutil.copytree(output, own)
    with bundle.writing(own, workdir) as folder:
        open(os.path.join(folder, 'new'), 'w').close()
    assert os.listdir(own) == ['new'] and not [n for n in os.listdir(tmp_path) if n.startswith('.')]

    dataset = tmp_path / 'dataset'  # A data set's own metadata.json beside its patients.
    dataset.mkdir()
    (dataset / 'metadata.json').write_text(json.dumps({'name': 'my cells', 'files': {'patients.csv': 'x'}}))
    (dataset / 'patients.csv').write_text('patient,label\nP001,all\n')
    extra = tmp_path / 'extra'  # A bundle with a file of the user's added.
    shutil.copytree(output, str(extra))
    (extra / 'notes.txt').write_text('mine')
    linked = tmp_path / 'linked'
    os.symlink(output, str(linked))
    cases = [
        (dataset, 'exists and is not a bundle (its metadata.json has no file list, or no schema version'),
        (extra, r'holds files that its metadata.json does not list \(notes.txt\)'),
        (linked, 'is a symbolic link'),
        (workdir, 'is or holds the run\'s workdir'),
        (os.path.dirname(workdir), 'is or holds the run\'s workdir'),
        (os.path.join(workdir, 'eval', 'bundle'), 'lies in the checkpoints or evaluation of the run'),
    ]
    before = tree(tmp_path), tree(workdir)
    for output_path, message in cases:
        with pytest.raises(files.OutputRefused, match=message):
            export.export(None, workdir, str(output_path))
    assert (tree(tmp_path), tree(workdir)) == before
