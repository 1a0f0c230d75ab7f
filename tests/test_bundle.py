"""The bundle format on its own, in seconds: a hand-made bundle (a four-node ONNX model whose
probabilities numpy recomputes) is written, checked, refused when changed, replaced only when it
is one, and predicts as its numpy reference. tests/test_export.py holds bundles of trained models."""
import csv
import hashlib
import json
import os

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from allflax import bundle, files
from allflax.data import preprocess

SIZE = 8
CLASSES = ('all', 'hem', 'other')
STEPS = ['resize_pad']
WEIGHTS = np.random.default_rng(0).normal(size=(3, len(CLASSES))).astype(np.float32) / 50


def reference_probabilities(tiles: np.ndarray) -> np.ndarray:
    """The tiny model in numpy: softmax(mean colour of the tile @ WEIGHTS)."""
    logits = tiles.astype(np.float64).mean(axis=(1, 2)) @ WEIGHTS.astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def write_model(path: str):
    nodes = [helper.make_node('Cast', ['image'], ['pixels'], to=TensorProto.FLOAT),
             helper.make_node('ReduceMean', ['pixels', 'axes'], ['colour'], keepdims=0),
             helper.make_node('MatMul', ['colour', 'weights'], ['logits']),
             helper.make_node('Softmax', ['logits'], ['probabilities'], axis=-1)]
    graph = helper.make_graph(
        nodes, 'tiny', [helper.make_tensor_value_info('image', TensorProto.UINT8, ['batch', SIZE, SIZE, 3])],
        [helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, ['batch', len(CLASSES)])],
        initializer=[numpy_helper.from_array(np.array([1, 2], np.int64), 'axes'),
                     numpy_helper.from_array(WEIGHTS, 'weights')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 8
    onnx.save(model, path)


def metadata_of() -> dict:
    """A metadata.json as export writes it, for the tiny model (files are added by bundle.finish)."""
    return {
        'schema_version': bundle.SCHEMA_VERSION, 'model': 'tiny', 'intended_use': 'tests',
        'classes': list(CLASSES),
        'input': {'name': 'image', 'shape': ['batch', SIZE, SIZE, 3], 'layout': 'NHWC', 'dtype': 'uint8',
                  'value_range': [0, 255], 'size': SIZE, 'channels': 3, 'color': 'RGB'},
        'output': {'name': 'probabilities', 'shape': ['batch', len(CLASSES)], 'dtype': 'float32', 'meaning': 'p'},
        'preprocessing': {'read': preprocess.READ_IMAGE, 'steps': preprocess.describe(STEPS, SIZE),
                          'normalization': {'mean': [0.5] * 3, 'std': [0.25] * 3, 'formula': 'f',
                                            'applied_by': 'model'}},
        'probability_rule': {'description': 'softmax', 'temperature': 1.0, 'temperature_source': 'none',
                             'test_time_augmentation': False, 'compute_dtype': 'float32'},
        'source': {'workdir': 'run', 'checkpoint_step': 3, 'exported': 'now'},
        'formats': {'onnx': {'file': bundle.ONNX, 'opset': 18, 'converter': 'onnx.helper'},
                    'stablehlo': {'file': bundle.STABLEHLO, 'platforms': ['cpu'], 'batch': 'symbolic'}},
        'config': {}, 'data': {'name': 'none', 'synthetic': True, 'split': 'patient', 'splits': {}},
        'evaluation': None, 'versions': {'allflax': 'test', 'jax': '-', 'flax': '-', 'onnx_opset': 18},
    }


def make_bundle(directory: str) -> str:
    os.makedirs(directory)
    write_model(os.path.join(directory, bundle.ONNX))
    with open(os.path.join(directory, bundle.STABLEHLO), 'wb') as f:
        f.write(b'not used here')
    bundle.finish(directory, metadata_of(), '# card\n')
    return directory


@pytest.fixture
def tiny_bundle(tmp_path):
    return make_bundle(str(tmp_path / 'bundle'))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_finish_makes_every_file_readable_as_the_umask_allows(tmp_path):
    """jax2onnx writes the weights owner-only; a bundle is for sharing."""
    directory = tmp_path / 'bundle'
    directory.mkdir()
    write_model(str(directory / bundle.ONNX))
    (directory / bundle.STABLEHLO).write_bytes(b'x')
    os.chmod(directory / bundle.ONNX, 0o600)
    umask = os.umask(0o027)
    try:
        bundle.finish(str(directory), metadata_of(), '# card\n')
    finally:
        os.umask(umask)
    assert {name: os.stat(directory / name).st_mode & 0o777 for name in os.listdir(directory)} == {
        'model.onnx': 0o640, 'model.jax': 0o640, 'MODEL_CARD.md': 0o640, 'metadata.json': 0o640}


def test_finish_refuses_invalid_metadata_naming_the_file(tmp_path):
    directory = tmp_path / 'bundle'
    directory.mkdir()
    with pytest.raises(bundle.BundleError, match=f'^{directory}/metadata.json: not a valid bundle metadata.json '
                                                 f'at model: '):
        bundle.finish(str(directory), dict(metadata_of(), model=''), '# card\n')
    assert os.listdir(directory) == ['MODEL_CARD.md']  # No metadata.json: not a bundle.


def test_finish_hashes_every_other_file_and_read_checks_them(tiny_bundle):
    metadata = read_json(os.path.join(tiny_bundle, 'metadata.json'))
    assert set(metadata['files']) == {'model.onnx', 'model.jax', 'MODEL_CARD.md'}
    for name, digest in metadata['files'].items():
        with open(os.path.join(tiny_bundle, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert open(os.path.join(tiny_bundle, 'MODEL_CARD.md')).read() == '# card\n'
    assert bundle.read_metadata(tiny_bundle) == metadata


@pytest.mark.parametrize('name', ['model.onnx', 'model.jax', 'MODEL_CARD.md'])
def test_a_changed_or_missing_file_is_named(tiny_bundle, name):
    path = os.path.join(tiny_bundle, name)
    with open(path, 'r+b') as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(bundle.BundleError, match=f'^{path} has changed since export: its SHA-256 is not the one '
                                                 f'metadata.json holds; export the bundle again$'):
        bundle.read_metadata(tiny_bundle)
    os.remove(path)
    with pytest.raises(bundle.BundleError, match=f'^{path} is missing from the bundle'):
        bundle.read_metadata(tiny_bundle)


def test_metadata_that_cannot_be_read_is_refused(tiny_bundle, tmp_path):
    path = os.path.join(tiny_bundle, 'metadata.json')
    metadata = read_json(path)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(bundle.BundleError, match=f'^{empty} is not a bundle: it has no metadata.json'):
        bundle.read_metadata(str(empty))
    for version in (2, 0, None, '1'):
        with open(path, 'w') as f:
            json.dump(dict(metadata, schema_version=version), f)
        with pytest.raises(bundle.BundleError, match=f'schema version {version!r} is not one this allflax reads '
                                                     f'\\(1\\)'):
            bundle.read_metadata(tiny_bundle)
    with open(path, 'w') as f:
        f.write('{"schema_version": 1,')
    with pytest.raises(bundle.BundleError, match=f'^{path} cannot be read as JSON'):
        bundle.read_metadata(tiny_bundle)
    for change, where in [({'classes': []}, 'classes'), ({'input': dict(metadata['input'], dtype='float32')},
                                                         'input/dtype'), ({'extra': 1}, r'\(top level\)')]:
        with pytest.raises(bundle.BundleError, match=f'^x.json: not a valid bundle metadata.json at {where}: '):
            bundle.validate(dict(metadata, **change), 'x.json')
    with pytest.raises(bundle.BundleError, match='schema version None'):
        bundle.validate(['not', 'a', 'dict'], 'x.json')


def test_preprocessing_unlike_this_allflax_is_refused(tiny_bundle):
    path = os.path.join(tiny_bundle, 'metadata.json')
    metadata = read_json(path)
    metadata['preprocessing']['steps'][0]['params'] = {'size': SIZE + 1}
    with open(path, 'w') as f:
        json.dump(metadata, f)
    expected = json.dumps(preprocess.describe(STEPS, SIZE))  # What this allflax does at the input's size.
    with pytest.raises(bundle.BundleError) as refused:
        bundle.read_metadata(tiny_bundle)
    assert str(refused.value) == (f'{path}: its preprocessing is not what this allflax does ({expected}); read it '
                                  f'with the allflax that wrote it')
    metadata['classes'] = []
    with open(path, 'w') as f:
        json.dump(metadata, f)
    with pytest.raises(bundle.BundleError, match=f'^{path}: not a valid bundle metadata.json at classes'):
        bundle.read_metadata(tiny_bundle)


def test_predictor_matches_its_numpy_reference_in_any_batch(tiny_bundle):
    tiles = np.random.default_rng(1).integers(0, 256, (7, SIZE, SIZE, 3), np.uint8)
    predictor = bundle.Predictor(tiny_bundle)
    assert predictor.classes == CLASSES and predictor.size == SIZE
    for batch_size in (1, 3, 32):
        probabilities = predictor.probabilities(tiles, batch_size)
        assert probabilities.shape == (7, 3) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, reference_probabilities(tiles), atol=1e-6)
    none = predictor.probabilities(tiles[:0])
    assert none.shape == (0, 3) and none.dtype == np.float32
    for bad in (tiles[0], tiles[:, :-1], tiles[..., :1], tiles.astype(np.float32)):
        with pytest.raises(bundle.BundleError, match=rf'takes uint8 tiles of shape \(N, {SIZE}, {SIZE}, 3\)'):
            predictor.probabilities(bad)


def write_cells(folder, count=5):
    os.makedirs(folder)
    rng = np.random.default_rng(2)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f'cell{i}.png')
        cv2.imwrite(path, rng.integers(0, 256, (SIZE + 2 * i, SIZE + i, 3), np.uint8))
        paths.append(path)
    with open(os.path.join(folder, 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    return paths


def test_the_cli_writes_predict_csvs_and_refuses_in_one_line(tiny_bundle, tmp_path, capsys):
    cells = str(tmp_path / 'cells')
    paths = write_cells(cells)
    output = str(tmp_path / 'out' / 'preds.csv')

    def cli(*args):
        """python -m allflax.bundle, in this process: (exit code, its summary or its stderr lines)."""
        capsys.readouterr()
        try:
            bundle.main([f'--bundle={tiny_bundle}', *args])
        except SystemExit as error:
            return error.code, capsys.readouterr().err.strip().splitlines()
        return 0, json.loads(capsys.readouterr().out)

    code, summary = cli(f'--input={cells}', f'--output={output}', '--batch_size=2')
    assert code == 0 and summary == {'output': output, 'predicted': 5, 'unreadable': 1,
                                     'errors': str(tmp_path / 'out' / 'preds.errors.csv'), 'checkpoint_step': 3}
    with open(output, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['path', 'predicted_class', *CLASSES]
    tiles = np.stack([preprocess.preprocess(preprocess.read_image(p), STEPS, SIZE) for p in paths])
    expected = reference_probabilities(tiles)
    assert [row[0] for row in rows[1:]] == paths
    assert [row[1] for row in rows[1:]] == [CLASSES[k] for k in expected.argmax(1)]
    np.testing.assert_allclose(np.float64([row[2:] for row in rows[1:]]), expected, atol=1e-6)
    with open(str(tmp_path / 'out' / 'preds.errors.csv'), newline='') as f:
        assert [row[0] for row in csv.reader(f)] == ['path', os.path.join(cells, 'broken.png')]

    # Its own CSVs are replaced; a user's file there is refused, and nothing changes.
    assert cli(f'--input={cells}', f'--output={output}')[0] == 0
    mine = tmp_path / 'mine.csv'
    mine.write_text('patient,age\nP1,7\n')
    code, lines = cli(f'--input={cells}', f'--output={mine}')
    assert code == 1 and lines == [f'error: {mine} exists and is not a predictions CSV that allflax wrote: name a '
                                   f'new path (allflax replaces only its own files)']
    assert mine.read_text() == 'patient,age\nP1,7\n' and not (tmp_path / 'mine.errors.csv').exists()
    code, lines = cli(f'--input={tmp_path / "none"}', f'--output={tmp_path / "x.csv"}')
    assert code == 1 and len(lines) == 1 and lines[0].startswith('error: ') and 'none' in lines[0]
    os.remove(os.path.join(tiny_bundle, 'model.jax'))
    code, lines = cli(f'--input={cells}', f'--output={tmp_path / "x.csv"}')
    assert code == 1 and lines == [f'error: {tiny_bundle}/model.jax is missing from the bundle (metadata.json lists it)']
    assert not (tmp_path / 'x.csv').exists()


def test_writing_replaces_its_own_bundle_whole_or_not_at_all(tiny_bundle, tmp_path):
    before = {name: open(os.path.join(tiny_bundle, name), 'rb').read() for name in os.listdir(tiny_bundle)}
    with pytest.raises(RuntimeError, match='conversion failed'):
        with bundle.writing(tiny_bundle) as folder:
            open(os.path.join(folder, 'model.onnx'), 'w').close()
            raise RuntimeError('conversion failed')
    assert {name: open(os.path.join(tiny_bundle, name), 'rb').read() for name in os.listdir(tiny_bundle)} == before
    assert sorted(os.listdir(tmp_path)) == ['bundle']  # No temporary folder left.
    with bundle.writing(tiny_bundle) as folder:
        assert os.path.dirname(folder) == str(tmp_path) and os.listdir(folder) == []
        make_bundle(os.path.join(folder, 'inner'))
    assert os.listdir(tiny_bundle) == ['inner'] and sorted(os.listdir(tmp_path)) == ['bundle']
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tiny_bundle).st_mode & 0o777 == 0o777 & ~umask

    new = str(tmp_path / 'a' / 'b' / 'new')
    with bundle.writing(new) as folder:
        open(os.path.join(folder, 'x'), 'w').close()
    assert os.listdir(new) == ['x']


def test_only_an_empty_folder_or_a_bundle_may_be_replaced(tiny_bundle, tmp_path):
    bundle.check_replaceable(tiny_bundle)
    bundle.check_replaceable(str(tmp_path / 'absent'))
    (tmp_path / 'empty').mkdir()
    bundle.check_replaceable(str(tmp_path / 'empty'))

    def refused(path, why, workdir=None):
        with pytest.raises(files.OutputRefused, match=f'^{path} {why}: export writes a bundle only into a new or '
                                                      f'empty folder, or over a bundle it wrote; name another '
                                                      f'--output$'):
            bundle.check_replaceable(str(path), workdir)

    (tmp_path / 'file').write_text('x')
    refused(tmp_path / 'file', 'exists and is not a folder')
    notes = tmp_path / 'notes'
    notes.mkdir()
    (notes / 'notes.txt').write_text('x')
    refused(notes, r'exists and is not a bundle \(it holds files and no metadata.json\)')
    (notes / 'metadata.json').write_text('{')
    refused(notes, r'exists and is not a bundle \(its metadata.json is not JSON: Expecting .*\)')
    metadata = read_json(os.path.join(tiny_bundle, 'metadata.json'))
    for foreign in ([1], {'files': {}}, {'schema_version': 1}, dict(metadata, schema_version=2),
                    dict(metadata, schema_version=0), dict(metadata, schema_version=True)):
        (notes / 'metadata.json').write_text(json.dumps(foreign))
        refused(notes, r'exists and is not a bundle \(its metadata.json has no file list, or no schema version up '
                       r'to 1\)')
    (notes / 'metadata.json').write_text(json.dumps(dict(metadata, classes=[])))
    refused(notes, rf'exists and is not a bundle \(its metadata.json is not valid: {notes}/metadata.json: not a '
                   rf'valid bundle metadata.json at classes: .*\)')
    (notes / 'metadata.json').write_text(json.dumps(metadata))
    refused(notes, r'holds files that its metadata.json does not list \(notes.txt\)')
    for name in 'abcdef':
        (notes / name).write_text('mine')
    refused(notes, r'holds files that its metadata.json does not list \(a, b, c, d, e\)')
    for name in ['notes.txt', *'abcdef']:
        os.remove(notes / name)
    bundle.check_replaceable(str(notes))  # Its listed files missing: a damaged bundle is still a bundle.
    for name in ['model.onnx', *'abcde']:
        os.symlink('/etc/hostname', notes / name)
    listed = dict(metadata, files={name: '0' * 64 for name in ['model.onnx', *'abcde']})
    (notes / 'metadata.json').write_text(json.dumps(listed))
    refused(notes, r'holds links or folders, which no bundle has \(a, b, c, d, e\)')
    for name in ['model.onnx', *'abcde']:
        os.remove(notes / name)
    (notes / 'metadata.json').write_text(json.dumps(metadata))
    (notes / 'model.jax').mkdir()
    refused(notes, r'holds links or folders, which no bundle has \(model.jax\)')
    os.symlink(tiny_bundle, tmp_path / 'link')
    refused(tmp_path / 'link', 'is a symbolic link')

    workdir = tmp_path / 'runs' / 'run'
    (workdir / 'checkpoints').mkdir(parents=True)
    refused(workdir, 'is or holds the run\'s workdir .*run', str(workdir))
    refused(tmp_path / 'runs', f'is or holds the run\'s workdir {workdir}', str(workdir))
    refused(workdir / 'checkpoints', f'lies in the checkpoints or evaluation of the run {workdir}', str(workdir))
    refused(workdir / 'eval' / 'b', f'lies in the checkpoints or evaluation of the run {workdir}', str(workdir))
    bundle.check_replaceable(str(workdir / 'bundle'), str(workdir))
    bundle.check_replaceable(str(tmp_path / 'runs' / 'run2'), str(workdir))  # A sibling whose name extends it.
    refused('/', f'is or holds the run\'s workdir {workdir}', str(workdir))
