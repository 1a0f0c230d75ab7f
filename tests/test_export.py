"""--mode=export's bundle against the checkpoint it came from, and `python -m allflax.deploy.bundle` without JAX."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx

import main
import platform_deps
from allflax import files, models
from allflax.data import pipeline, sources
from allflax.deploy import bundle, model_card, predictor, quantize
from allflax.evaluation import metrics
from allflax.modes import export, predict
from allflax.training import loop, restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ('jax', 'jaxlib', 'flax', 'orbax', 'grain', 'tensorflow')


def train_and_export(config, folder, **options):
    workdir, output = str(folder / 'run'), str(folder / 'bundle')
    loop.train_and_evaluate(config, workdir)
    return config, workdir, output, export.export(config, workdir, output, **options)


@pytest.fixture(scope='module')
def vgg_bundle(make_tiny_config, tmp_path_factory):
    """A tiny VGG19+MHSA run of 2 steps, evaluated with test-time augmentation and a fitted
    temperature (so the bundle carries both), and its bundle, with an int8 copy of its model (which
    its predictor runs unless --precision=float32). From scratch on the caffe input convention (that
    of Keras's VGG weights), which the B3 bundle's imagenet_mean_std complements."""
    config = make_tiny_config()
    with config.unlocked():
        config.data.input_convention = 'caffe'
        config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 2  # One save, one eval.
        config.eval.tta = True
        config.eval.temperature_scaling = True
        config.eval.bootstrap_samples = 20
    return train_and_export(config, tmp_path_factory.mktemp('vgg19_mhsa'), int8=True)


@pytest.fixture(scope='module')
def b3_bundle(make_tiny_b3_config, tmp_path_factory):
    """A tiny trained EfficientNetV2-B3+SE run and its bundle."""
    return train_and_export(make_tiny_b3_config(), tmp_path_factory.mktemp('efficientnetv2_b3_se'))


def evaluated_probabilities(workdir, class_names):
    """The checkpoint's JAX probabilities of the test split, as training's evaluation wrote them."""
    with open(os.path.join(workdir, 'eval', 'test', 'predictions.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(row[name]) for name in class_names] for row in rows])


def _unwrapped(tree):
    """A checkpoint's tree of NNX variables as plain arrays: {'kernel': {'value': a}} -> {'kernel': a}."""
    if isinstance(tree, dict):
        return tree['value'] if set(tree) == {'value'} else {key: _unwrapped(value) for key, value in tree.items()}
    return tree


def checkpoint_forward(config, workdir, step, num_classes):
    """`logits(normalised float32 images)` of a checkpoint, built here: its weights and batch
    statistics read by Orbax alone into the recipe's model in eval mode, run on this host's default
    path (allflax's CPU kernels where built), where the bundle was traced on XLA's portable ops."""
    path, checkpointer = os.path.join(workdir, 'checkpoints', str(step), 'state'), ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(path).item_metadata.tree)
    saved = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    abstract = nnx.eval_shape(lambda: models.create(config.model.name, num_classes,
                                                    image_size=config.data.image_size, **config.model.options))
    graphdef, params, batch_stats, rngs = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    nnx.replace_by_pure_dict(params, _unwrapped(saved['params']))
    nnx.replace_by_pure_dict(batch_stats, _unwrapped(saved['batch_stats']))

    @jax.jit
    def logits(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats, rngs)  # Abstract RNGs: eval mode draws none.
        model.eval()
        return model(images)

    return lambda images: np.asarray(logits(params, batch_stats, images))


def view_logits(forward, tiles, normalization, tta):
    """(views, N, classes): the logits of uint8 `tiles` normalised as metadata.json says, as they
    are and, with `tta`, in the 7 other symmetries of a square."""
    mean, std = np.float32(normalization['mean']), np.float32(normalization['std'])
    pixels = np.asarray(tiles, np.float32)
    if normalization['channel_order'] == 'BGR':
        pixels = pixels[..., [2, 1, 0]]
    images = (pixels * np.float32(normalization['scale']) - mean) / std
    views = [np.rot90(oriented, k, axes=(1, 2)) for oriented in (images, images.transpose(0, 2, 1, 3))
             for k in range(4)]
    return np.stack([forward(np.ascontiguousarray(view)) for view in (views if tta else views[:1])])


def probabilities_by_rule(views, temperature):
    """metadata.json's probability rule: sigmoid of logits / temperature, normalised, averaged over views."""
    scores = 1 / (1 + np.exp(-views.astype(np.float64) / temperature))
    return (scores / scores.sum(axis=-1, keepdims=True)).mean(axis=0)


# Bundle against this file's own computation: measured 6e-8 here for both recipes.
TOLERANCE = 1e-6


@pytest.mark.parametrize('recipe', ['vgg_bundle', 'b3_bundle'])
def test_bundle_predicts_as_the_checkpoint(recipe, request):
    config, workdir, output, summary = request.getfixturevalue(recipe)
    metadata = bundle.read_metadata(output)
    thumbnails = {error['thumbnail'] for error in metadata['evaluation']['confident_errors']['shown']}
    assert set(metadata['files']) == {'model.onnx', 'model.onnx.data', 'model.jax', 'MODEL_CARD.md',
                                      'reliability.png', *thumbnails, 'predict.py', 'files.py', 'preprocess.py',
                                      'image_files.py', 'requirements.txt',
                                      *(['model.int8.onnx'] if recipe == 'vgg_bundle' else [])}
    assert set(summary['bytes']) == {*metadata['files'], 'metadata.json'}
    class_names = sources.synthetic.CLASS_NAMES[config.data.name]  # The data set's own definition.
    assert metadata['classes'] == list(class_names)
    assert metadata['source']['checkpoint_step'] == config.total_steps  # The run's last checkpoint.
    splits = pipeline.load(config).splits
    test = splits['test']
    rule = metadata['probability_rule']
    # The run's input convention: Keras's caffe constants for VGG (keras.applications.vgg19.preprocess_input),
    # (x/255 - ImageNet mean) / std for B3.
    normalization = metadata['preprocessing']['normalization']
    expected_normalization = {
        'caffe': {'channel_order': 'BGR', 'scale': 1.0, 'mean': [103.939, 116.779, 123.68], 'std': [1.0] * 3},
        'imagenet_mean_std': {'channel_order': 'RGB', 'scale': 1 / 255, 'mean': [0.485, 0.456, 0.406],
                              'std': [0.229, 0.224, 0.225]}}[normalization['convention']]
    assert normalization['convention'] == ('caffe' if recipe == 'vgg_bundle' else 'imagenet_mean_std')
    assert {key: normalization[key] for key in expected_normalization} == expected_normalization
    views = view_logits(checkpoint_forward(config, workdir, config.total_steps, len(class_names)), test.images,
                        metadata['preprocessing']['normalization'], rule['test_time_augmentation'])
    expected = probabilities_by_rule(views, rule['temperature'])

    predictor = bundle.Predictor(output, precision='float32')
    onnx = predictor.probabilities(test.images, batch_size=7)  # Batches of 7 and a last of another size.
    assert onnx.dtype == np.float32 and np.abs(onnx - expected).max() <= TOLERANCE
    np.testing.assert_array_equal(onnx.argmax(1), expected.argmax(1))
    # Training's evaluation of the test split (its TTA, the temperature it fitted on val) agrees.
    assert np.abs(onnx - evaluated_probabilities(workdir, class_names)).max() <= TOLERANCE
    if config.eval.tta:  # A bundle without the views, or without the temperature, would fail above.
        assert rule['test_time_augmentation'] and rule['temperature'] != 1.0
        assert np.abs(onnx - probabilities_by_rule(views[:1], rule['temperature'])).max() > 5 * TOLERANCE
        assert np.abs(onnx - probabilities_by_rule(views, 1.0)).max() > 5 * TOLERANCE
    # One image alone as in a batch: batch norm runs on its running statistics.
    np.testing.assert_allclose(predictor.probabilities(test.images[-1:])[0], onnx[-1], atol=1e-6)

    with open(os.path.join(output, 'model.jax'), 'rb') as f:
        stablehlo = jax.export.deserialize(bytearray(f.read()))
    assert set(stablehlo.platforms) == {'cpu', 'cuda', 'tpu'}
    if not config.eval.tta:  # Run for one recipe: compiling VGG19+MHSA's 8 views costs 5 s more.
        assert np.abs(np.asarray(stablehlo.call(test.images[:5])) - expected[:5]).max() <= TOLERANCE

    # The bundle's facts about the data and its scores, counted here.
    accuracy = float(np.mean(expected.argmax(1) == test.labels))
    assert metadata['evaluation']['cell_level']['accuracy'] == accuracy
    data = metadata['data']
    assert (data['name'], data['synthetic'], data['skipped_images']) == (config.data.name, True, 0)
    assert set(data['splits']) == set(splits)
    for name, split in splits.items():
        counts = np.bincount(split.labels, minlength=len(class_names)).tolist()
        assert data['splits'][name] == {'images': len(split.labels), 'patients': len(set(split.patients)),
                                        'class_counts': dict(zip(class_names, counts))}, name
    patients = [set(split.patients) for split in splits.values()]
    assert sum(len(split.labels) for split in splits.values()) == config.data.num_images
    assert sum(map(len, patients)) == len(set().union(*patients)) == config.data.num_patients  # Patient-wise.
    card = open(os.path.join(output, 'MODEL_CARD.md')).read()
    assert 'Not a medical device' in card and 'synthetic images' in card and 'No external validation' in card
    assert f'{accuracy:.4f}' in card and 'Per patient' in card
    # Each interval's method beside it; the classes with fewer than 3 test patients named.
    with open(os.path.join(workdir, 'eval', 'test', 'metrics.json')) as f:
        evaluated = json.load(f)
    assert f'| Clopper-Pearson exact, {len(set(test.patients))} patients |' in card
    assert evaluated['input_convention'] == normalization['convention'] == config.data.input_convention
    assert f'- Input convention: `{normalization["convention"]}`, applied inside the model: ' in card
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
    """`python -m allflax.deploy.bundle ...` in a fresh process; returns (the run, the forbidden modules it imported)."""
    script = ('import json, sys\nfrom allflax.deploy import bundle\ntry:\n    bundle.main(sys.argv[1:])\nfinally:\n'
              f'    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})), '
              'file=sys.stderr)\n')
    run = subprocess.run([sys.executable, '-c', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    *lines, imported = run.stderr.splitlines()
    return run, lines, json.loads(imported)


# What pip and uv say when they cannot reach a package index (not a pin they cannot meet).
NO_INDEX = ('NewConnectionError', 'Failed to establish a new connection', 'Temporary failure in name resolution',
            'Name or service not known', 'Network is unreachable', 'ConnectTimeout', 'ProxyError',
            'error sending request', 'dns error', 'failed to lookup address')


@pytest.fixture(scope='session')
def bundle_venv(tmp_path_factory):
    """`venv(requirements.txt)`: the python of a new virtual environment that holds only the packages
    of that file (and what they depend on; no pip), made once per content per session by uv (a test
    requirement, as pip's resolver but seconds from its cache, where pip takes half a minute)."""
    made = {}

    def venv(requirements: str) -> str:
        with open(requirements, 'rb') as f:
            key = hashlib.sha256(f.read()).hexdigest()[:16]
        if key not in made:
            folder = str(tmp_path_factory.mktemp(f'venv_{key}'))
            uv = shutil.which('uv', path=os.path.dirname(sys.executable)) or 'uv'
            for command in ([uv, 'venv', '--quiet', '--python', sys.executable, folder],
                            [uv, 'pip', 'install', '--quiet', '--python', os.path.join(folder, 'bin', 'python'),
                             '-r', requirements]):
                run = subprocess.run(command, capture_output=True, text=True, timeout=600)
                said = run.stdout + run.stderr
                if run.returncode and any(sign in said for sign in NO_INDEX):
                    platform_deps.missing(f'no package index reachable to install {requirements}: '
                                          f'{said.strip().splitlines()[-1]}')
                assert run.returncode == 0, f'{" ".join(command)}:\n{said[-3000:]}'
            made[key] = os.path.join(folder, 'bin', 'python')
        return made[key]
    return venv


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def test_the_bundle_alone_and_its_cli_predict_as_predict_mode(vgg_bundle, bundle_venv, tmp_path):
    """The bundle's predict.py in a virtual environment made from its requirements.txt alone, run
    from another directory, and `python -m allflax.deploy.bundle` (without JAX): --mode=predict's CSVs."""
    config, workdir, output, _ = vgg_bundle
    cells = str(tmp_path / 'cells')
    write_cells(cells, np.random.default_rng(0))
    run, lines, imported = run_bundle_cli(f'--bundle={output}', f'--input={cells}',
                                          f'--output={tmp_path / "bundle.csv"}', '--precision=float32')
    assert run.returncode == 0, run.stderr
    assert imported == []
    assert lines == [f'unreadable: {cells}/broken.png: not a decodable image (truncated, corrupt or not an image)']

    python = bundle_venv(os.path.join(output, 'requirements.txt'))
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    look = ('import importlib.util, importlib.metadata as m\n'
            f'print([name for name in {(*FORBIDDEN, "allflax", "jsonschema")!r} if importlib.util.find_spec(name)])\n'
            'print(sorted(f"{n}=={m.version(n)}" for n in ("numpy", "opencv-python-headless", "onnxruntime")))\n')
    seen = subprocess.run([python, '-c', look], cwd=elsewhere, env=environment, capture_output=True, text=True,
                          timeout=60)
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        pinned = sorted(line.strip() for line in f if line.split('==')[0] in predictor.REQUIREMENTS)
    assert seen.stdout.splitlines() == ['[]', repr(pinned)], seen.stderr
    alone = subprocess.run([python, os.path.join(output, 'predict.py'), f'--input={cells}', '--output=alone.csv',
                            '--precision=float32'], cwd=elsewhere, env=environment, capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert alone.stderr.splitlines() == lines

    predict.predict(config, workdir, cells, str(tmp_path / 'predict.csv'))
    by_mode = read_rows(tmp_path / 'predict.csv')
    assert len(by_mode) == 7 and by_mode[0][-1] == 'decision_rule'
    for rows, atol in ((read_rows(tmp_path / 'bundle.csv'), 1e-4), (read_rows(elsewhere / 'alone.csv'), 1e-4)):
        assert rows[0] == by_mode[0]  # The same columns.
        assert [row[:2] for row in rows] == [row[:2] for row in by_mode]  # Paths and classes.
        np.testing.assert_allclose(np.float64([row[2:-1] for row in rows[1:]]),
                                   np.float64([row[2:-1] for row in by_mode[1:]]), atol=atol)
        assert {row[-1] for row in rows[1:]} == {'argmax'}  # Four classes: no operating point.
    np.testing.assert_allclose(np.float64([row[2:-1] for row in read_rows(elsewhere / 'alone.csv')[1:]]),
                               np.float64([row[2:-1] for row in read_rows(tmp_path / 'bundle.csv')[1:]]), atol=1e-6)
    for errors in (tmp_path / 'bundle.errors.csv', elsewhere / 'alone.errors.csv'):
        assert read_rows(errors) == read_rows(tmp_path / 'predict.errors.csv') == [
            ['path', 'reason'], [f'{cells}/broken.png', 'not a decodable image (truncated, corrupt or not an image)']]


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
        (dataset, r'exists and is not a bundle \(its metadata.json has no file list, or no schema version'),
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


def bundle_texts(output):
    return {name: open(os.path.join(output, name), 'rb').read() for name in os.listdir(output)}


@pytest.mark.parametrize('recipe', ['vgg_bundle', 'b3_bundle'])
def test_the_bundle_answers_the_card_from_the_run_and_names_no_local_path(recipe, request, tmp_path_factory):
    config, workdir, output, _ = request.getfixturevalue(recipe)
    metadata, texts = bundle.read_metadata(output), bundle_texts(output)
    # No file names a folder of this machine: not the run's, the data cache's (both under pytest's tmp) nor
    # this checkout's (which model.jax's source locations would hold).
    for local in (str(tmp_path_factory.getbasetemp()), ROOT):
        assert [name for name, text in texts.items() if local.encode() in text] == [], local
    assert metadata['source']['workdir'] == 'run'
    assert metadata['config']['data']['cache_dir'] == os.path.basename(config.data.cache_dir)

    assert metadata['data']['facts'] == sources.describe(config.data, seed=config.seed).as_dict()
    assert metadata['data']['fold'] is None
    assert metadata['data']['split_independence']['level'] == 'patient'  # Synthetic sets have patient ids.
    # One device takes the batch of 8 at once; batch norm (B3) normalises over those 8 images.
    batch_norm = 8 if len(metadata['classes']) == 2 else None
    assert metadata['training'] == {'batch_size': 8, 'devices': 1, 'micro_batches': 1, 'batch_norm_batch': batch_norm}
    assert ('- Training batch: 8 images per step on 1 device; '
            + ('batch norm normalised by the statistics of 8 images (one micro-batch, over all devices).'
               if batch_norm else 'no batch norm.')) in texts['MODEL_CARD.md'].decode()
    with open(os.path.join(workdir, 'eval', 'test', 'metrics.json')) as f:
        point = json.load(f).get('operating_point')
    if len(metadata['classes']) == 2:  # B3+SE on synthetic_cnmc: the operating point chosen on val.
        rule = metadata['decision_rule']
        assert (rule['kind'], rule['positive_class'], rule['threshold']) == ('threshold', 'all', point['threshold'])
        assert point['val_sensitivity'] >= point['target_sensitivity'] == config.eval.target_sensitivity
    else:
        assert point is None and metadata['decision_rule']['kind'] == 'argmax'
    steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints')) if name.isdigit())
    assert metadata['checkpoint'] == {'step': steps[-1], 'chosen': 'latest', 'how': 'the latest checkpoint of the run',
                                      'saved_steps': steps, 'best_validation_step': steps[-1],
                                      'validation_accuracy': metadata['checkpoint']['validation_accuracy']}
    assert export.checkpoint_facts(workdir, steps[-1], named=True)['how'] == \
        f'the step named by --checkpoint_step ({steps[-1]})'

    # The reliability diagram: a PNG, hashed like every file, shown in the card.
    diagram = metadata['evaluation']['reliability_diagram']
    assert diagram['file'] == 'reliability.png' and texts['reliability.png'].startswith(b'\x89PNG\r\n\x1a\n')
    assert metadata['files']['reliability.png'] == hashlib.sha256(texts['reliability.png']).hexdigest()
    card = texts['MODEL_CARD.md'].decode()
    assert '![reliability.png](reliability.png)' in card

    # The confusion matrix and the most confident errors, counted here from what evaluation wrote.
    class_names = list(metadata['classes'])
    with open(os.path.join(workdir, 'eval', 'test', 'predictions.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    labels = np.array([class_names.index(row['label']) for row in rows])
    probabilities = evaluated_probabilities(workdir, class_names)
    matrix = metrics.confusion_matrix(labels, probabilities.argmax(1), len(class_names)).tolist()
    assert metadata['evaluation']['cell_level']['confusion_matrix'] == matrix
    for name, row in zip(class_names, matrix):
        assert f'| {name} | ' + ' | '.join(map(str, row)) + ' |' in card
    wrong = [i for i in range(len(rows)) if probabilities[i].argmax() != labels[i]]
    ranked = sorted(wrong, key=lambda i: -probabilities[i].max())[:export.CONFIDENT_ERRORS]
    errors = metadata['evaluation']['confident_errors']
    assert (errors['errors'], errors['images']) == (len(wrong), len(rows)) and ranked
    assert [e['image_id'] for e in errors['shown']] == [rows[i]['image_id'] for i in ranked]
    test = pipeline.load(config).splits['test']
    for error, i in zip(errors['shown'], ranked):
        assert error['probability'] == probabilities[i].max() and f'`{error["image_id"]}`' in card
        thumbnail = cv2.cvtColor(cv2.imread(os.path.join(output, error['thumbnail'])), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(thumbnail, test.images[int(rows[i]['index'])])  # 32 px: not resized.
        assert f'![{error["thumbnail"]}]({error["thumbnail"]})' in card

    rule = ('- Decision rule: a threshold of' if len(metadata['classes']) == 2 else '- Decision rule: argmax')
    for answer in ('### Out of scope: do not use it for', rule, '## Licence and citation', 'no checkout of allflax',
                   'venv/bin/pip install -r THIS_FOLDER/requirements.txt',
                   'venv/bin/python THIS_FOLDER/predict.py --input=cells/ --output=predictions.csv',
                   'arXiv:2508.17216', 'arXiv:2601.01026', '| Specimen | none: synthetic',
                   f'- Checkpoint: step {steps[-1]} of the run `run`, exported as the latest checkpoint of the run.'):
        assert answer in card, answer


def test_the_card_of_a_fold_run_names_its_fold(vgg_bundle):
    """data.fold = 1 of 3, as export records it from the config and splits.json, without a training."""
    config, workdir, output, _ = vgg_bundle
    with open(os.path.join(workdir, 'splits.json')) as f:
        splits = json.load(f)
    fold = config.copy_and_resolve_references()
    with fold.unlocked():
        fold.data.fold, fold.data.num_folds = 1, 3
    data = export.data_facts(fold.data, splits, seed=config.seed)
    assert (data['split'], data['fold']) == ('patient', {'index': 1, 'count': 3})
    metadata = dict(bundle.read_metadata(output), data=data)
    bundle.validate(metadata, 'metadata.json')
    card = model_card.render(metadata)
    assert card.splitlines()[0].endswith(', fold 1 of 3')
    assert 'k-fold by patient: this model is fold 1 of 3 (data.fold=1, folds numbered 0–2)' in card
    assert 'The test split (fold 1 of 3; ' in card and 'The split is by' not in card


def test_the_card_says_what_the_split_and_the_micro_batches_were(vgg_bundle):
    """Image-level splits (no patient ids, or data.split='random') and batch norm over micro-batches, as export
    reads them from splits.json and config.json's `derived`, without a training."""
    config, workdir, output, _ = vgg_bundle
    with open(os.path.join(workdir, 'splits.json')) as f:
        splits = json.load(f)
    no_ids = dict(splits, near_duplicate_groups={'max_distance': 4, 'images_without_patient_id': 150, 'pairs': 2,
                                                 'groups_joined': 1, 'images_joined': 3})
    random_split = config.copy_and_resolve_references()
    with random_split.unlocked():
        random_split.data.split = 'random'
    for data, reason in [(export.data_facts(config.data, no_ids, seed=0),
                          f'150 of {sum(splits[n]["num_examples"] for n in ("train", "val", "test"))} images have no '
                          'patient id; near-duplicate images (perceptual hash within 4 bits) were kept in one split'),
                         (export.data_facts(random_split.data, splits, seed=0), "data.split='random' splits images")]:
        metadata = dict(bundle.read_metadata(output), data=data,
                        training={'batch_size': 256, 'devices': 1, 'micro_batches': 4, 'batch_norm_batch': 64})
        bundle.validate(metadata, 'metadata.json')
        card = model_card.render(metadata)
        statement = f'image-level split: not patient-independent: {reason}'
        assert f'**{statement}' in card and f'- I{statement[1:]}' in card  # Training data; limitations.
        assert ('- Training batch: 256 images per step on 1 device, as 4 micro-batches of 64 (gradient accumulation); '
                'batch norm normalised by the statistics of 64 images (one micro-batch, over all devices) and updated '
                "its running averages once per micro-batch: not the whole batch's update.") in card


def test_the_card_of_a_monte_carlo_iteration_names_both_intervals(vgg_bundle, tmp_path):
    _, _, output, _ = vgg_bundle
    iteration = tmp_path / 'W' / 'mc' / '3'
    iteration.mkdir(parents=True)
    scores = {'n': 5, 'mean': 0.93, 'std': 0.0158, 'percentile_95': [0.911, 0.949],
              'corrected_t_interval_95': [0.899817, 0.960183]}
    summary = {'iterations': 5, 'seeds': [0, 1, 2, 3, 4],
               'methods': {'corrected_t_interval_95': 'corrected resampled t (Nadeau and Bengio 2003) of the mean',
                           'percentile_95': 'percentile range (2.5-97.5 %) of the runs', 'unit': 'patients',
                           'n_test': 3.0, 'n_train': 11.0, 'test_train_ratio': 3 / 11},
               'metrics': {name: scores for name in ('accuracy', 'balanced_accuracy', 'f1_macro', 'roc_auc', 'ece')}}
    assert export.repeated_runs_facts(str(iteration)) is None  # No montecarlo.json yet.
    (tmp_path / 'W' / 'montecarlo.json').write_text(json.dumps(summary))
    repeated = export.repeated_runs_facts(str(iteration))
    assert (repeated['iteration'], repeated['iterations']) == (3, 5) and list(repeated['metrics']) == ['cell_level']
    assert export.repeated_runs_facts(str(tmp_path / 'W')) is None  # The Monte Carlo run's own folder: no model.
    metadata = dict(bundle.read_metadata(output), repeated_runs=repeated)
    bundle.validate(metadata, 'metadata.json')
    card = model_card.render(metadata)
    assert 'This model is iteration 3 of 5 re-splits' in card
    assert '| accuracy | 0.9300 | 0.0158 | 0.8998 – 0.9602 | 0.9110 – 0.9490 |' in card
    assert '(1) corrected resampled t (Nadeau and Bengio 2003) of the mean' in card
    assert '(2) percentile range (2.5-97.5 %) of the runs' in card


def test_paths_of_the_exporting_machine_are_cut_to_what_a_reader_can_use():
    assert export.shareable_path('/data/me/C-NMC_Leukemia/fold_0/all/UID_1_1_1_all.bmp', '/data/me') == \
        'C-NMC_Leukemia/fold_0/all/UID_1_1_1_all.bmp'
    assert export.shareable_path('data/fold_0/all/UID_1_1_1_all.bmp', 'data/') == 'fold_0/all/UID_1_1_1_all.bmp'
    assert export.shareable_path('/elsewhere/UID_1_1_1_all.bmp', '/data/me') == 'UID_1_1_1_all.bmp'
    assert export.shareable_path('test/3/sha1:0123', '') == 'test/3/sha1:0123'
    config = {'data': {'dir': '/home/me/C-NMC_Leukemia/', 'cache_dir': '/tmp/cache', 'name': 'cnmc2019',
                       'augment': ['flip', '/abs/x']}, 'model': {'init_from': ''}, 'seed': 0}
    assert export.without_machine_paths(config) == {
        'data': {'dir': 'C-NMC_Leukemia', 'cache_dir': 'cache', 'name': 'cnmc2019', 'augment': ['flip', 'x']},
        'model': {'init_from': ''}, 'seed': 0}


def test_the_onnx_check_allows_for_the_temperature(tmp_path):
    """A temperature under 1 divides the converted model's float noise in the logits by itself: the
    allowed |Δp| grows by 1/T (a fitted T of 0.05 made an untrained binary run's export fail)."""
    from test_bundle import SIZE, reference_probabilities, write_model
    path = str(tmp_path / 'model.onnx')
    write_model(path)
    tiles = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), np.uint8)
    reference = reference_probabilities(tiles).astype(np.float32)
    reference[:, 0] += 1.5e-4  # Off by more than 1e-4, not by 2e-4.
    with pytest.raises(RuntimeError, match=r'max \|Δp\| 0.00015 on 4 tiles \(at most 0.0001 allowed at temperature 1\)'):
        export.check_onnx(path, reference, tiles)
    assert export.check_onnx(path, reference, tiles, temperature=0.5) == pytest.approx(1.5e-4, abs=2e-6)
    with pytest.raises(RuntimeError, match='at most 0.0001 allowed at temperature 3'):
        export.check_onnx(path, reference, tiles, temperature=3.0)


def test_an_int8_bundle_runs_int8_by_default_states_what_it_moved_and_keeps_float32(vgg_bundle, tmp_path):
    """`--mode=export --int8`: an int8 copy of the model, hashed as every file; the predictor runs it
    unless --precision=float32, which gives the float32 model's probabilities; metadata.json's figures
    are those of the recorded test split, recomputed here by ONNX Runtime directly."""
    import onnxruntime
    config, workdir, output, summary = vgg_bundle
    metadata = bundle.read_metadata(output)
    assert 'model.int8.onnx' in metadata['files'] and summary['int8_test'] == metadata['formats']['onnx_int8']['test']
    test = pipeline.load(config, recorded=restore.run_summary(workdir)['splits'], run=workdir).splits['test']
    float32, int8 = (onnxruntime.InferenceSession(os.path.join(output, name), providers=['CPUExecutionProvider'])
                     .run(None, {'image': test.images})[0] for name in ('model.onnx', 'model.int8.onnx'))
    figures = metadata['formats']['onnx_int8']['test']
    assert figures['test_images'] == len(test.labels)
    assert figures['int8_accuracy'] == pytest.approx(np.mean(int8.argmax(1) == test.labels))
    assert figures['float32_accuracy'] == pytest.approx(np.mean(float32.argmax(1) == test.labels))
    assert figures['max_abs_probability_difference'] == pytest.approx(np.abs(int8 - float32).max(), abs=1e-6)
    assert 0 < figures['max_abs_probability_difference'] < 0.5  # Quantised, not a copy; still the same model.
    assert bundle.Predictor(output).precision == 'int8'
    np.testing.assert_allclose(bundle.Predictor(output).probabilities(test.images), int8, atol=1e-6)
    np.testing.assert_allclose(bundle.Predictor(output, precision='float32').probabilities(test.images), float32,
                               atol=1e-6)
    with pytest.raises(bundle.BundleError, match='holds no int8 model'):
        predictor.precision_of({'formats': {'onnx': {'file': 'model.onnx'}}}, 'int8', output)
    with pytest.raises(bundle.BundleError, match='--precision=int4: give one of int8, float32'):
        predictor.precision_of(metadata, 'int4', output)
    assert '`predict.py` runs `model.int8.onnx` by default' in open(os.path.join(output, 'MODEL_CARD.md')).read()
    copy = str(tmp_path / 'copy')
    shutil.copytree(output, copy)
    with open(os.path.join(copy, 'model.int8.onnx'), 'ab') as f:
        f.write(b'\0')
    with pytest.raises(bundle.BundleError, match='model.int8.onnx has changed since export'):
        bundle.Predictor(copy)


def test_int8_is_refused_when_it_moves_test_accuracy_by_half_a_point():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    float32 = rng.dirichlet(np.ones(3), 400)
    int8 = float32.copy()
    int8[:1] = int8[:1, ::-1]  # At most 1 of 400 images changes class: under half a point.
    int8 += rng.normal(0, 1e-3, int8.shape)
    figures = quantize.compare(labels, float32, int8)
    right = [sum(int(np.argmax(row) == label) for row, label in zip(p, labels)) for p in (float32, int8)]
    assert figures['float32_accuracy'] == right[0] / 400 and figures['int8_accuracy'] == right[1] / 400
    assert figures['accuracy_change_points'] == pytest.approx(100 * (right[1] - right[0]) / 400)
    assert figures['max_abs_probability_difference'] == max(abs(a - b) for a, b in zip(int8.ravel(), float32.ravel()))
    assert figures['same_class'] == np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(int8, float32)])
    worse = float32.copy()
    wrong = np.flatnonzero(float32.argmax(1) == labels)[:2]  # 2 of 400 right ones made wrong: exactly 0.5 points.
    worse[wrong] = np.roll(np.eye(3)[labels[wrong]], 1, axis=1)
    with pytest.raises(quantize.QuantizationRefused, match=r'-0\.50 points, 400 images; at most ±0\.5 allowed'):
        quantize.compare(labels, float32, worse)
