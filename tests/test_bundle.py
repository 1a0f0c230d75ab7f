"""The bundle format on its own, in seconds: a hand-made bundle (a four-node ONNX model whose
probabilities numpy recomputes) is written, checked, refused when changed, replaced only when it
is one, and predicts as its numpy reference. tests/test_export.py holds bundles of trained models."""
import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from allflax import files
from allflax.data import image_files, preprocess, sources
from allflax.data.sources import fake_trees
from allflax.deploy import bundle, model_card
from configs import common

SIZE = 8
CLASSES = ('all', 'hem', 'other')
STEPS = ['resize_pad']
# The files every bundle's predictor is (bundle.write_predictor).
PREDICTOR_FILES = ('predict.py', 'files.py', 'preprocess.py', 'image_files.py', 'requirements.txt')
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
        'model.onnx': 0o640, 'model.jax': 0o640, 'MODEL_CARD.md': 0o640, 'metadata.json': 0o640,
        **dict.fromkeys(PREDICTOR_FILES, 0o640)}


def test_finish_refuses_invalid_metadata_naming_the_file(tmp_path):
    directory = tmp_path / 'bundle'
    directory.mkdir()
    with pytest.raises(bundle.BundleError, match=f'^{directory}/metadata.json: not a valid bundle metadata.json '
                                                 f'at model: '):
        bundle.finish(str(directory), dict(metadata_of(), model=''), '# card\n')
    assert 'metadata.json' not in os.listdir(directory)  # Not a bundle.


def test_finish_hashes_every_other_file_and_read_checks_them(tiny_bundle):
    metadata = read_json(os.path.join(tiny_bundle, 'metadata.json'))
    assert set(metadata['files']) == {'model.onnx', 'model.jax', 'MODEL_CARD.md', *PREDICTOR_FILES}
    for name, digest in metadata['files'].items():
        with open(os.path.join(tiny_bundle, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert open(os.path.join(tiny_bundle, 'MODEL_CARD.md')).read() == '# card\n'
    assert bundle.read_metadata(tiny_bundle) == metadata


@pytest.mark.parametrize('name', ['model.onnx', 'model.jax', 'MODEL_CARD.md', 'predict.py', 'requirements.txt'])
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
        """python -m allflax.deploy.bundle, in this process: (exit code, its summary or its stderr lines)."""
        capsys.readouterr()
        try:
            bundle.main([f'--bundle={tiny_bundle}', *args])
        except SystemExit as error:
            return error.code, capsys.readouterr().err.strip().splitlines()
        return 0, json.loads(capsys.readouterr().out)

    code, summary = cli(f'--input={cells}', f'--output={output}', '--batch_size=2')
    assert code == 0 and summary == {'output': output, 'predicted': 5, 'unreadable': 1,
                                     'errors': str(tmp_path / 'out' / 'preds.errors.csv'), 'checkpoint_step': 3,
                                     'precision': 'float32'}
    with open(output, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['path', 'predicted_class', *CLASSES, 'decision_rule']
    assert {row[-1] for row in rows[1:]} == {'argmax'}
    tiles = np.stack([preprocess.preprocess(preprocess.read_image(p), STEPS, SIZE) for p in paths])
    expected = reference_probabilities(tiles)
    assert [row[0] for row in rows[1:]] == paths
    assert [row[1] for row in rows[1:]] == [CLASSES[k] for k in expected.argmax(1)]
    np.testing.assert_allclose(np.float64([row[2:-1] for row in rows[1:]]), expected, atol=1e-6)
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


def card_metadata(*, fold=None) -> dict:
    """metadata_of() with the fields export adds for the card: a C-NMC-like run's facts, checkpoint,
    decision rule, evaluation with a reliability diagram and its most confident errors."""
    metadata = metadata_of()
    metadata.update(
        out_of_scope_uses=['diagnosis'], licence={'code': 'Apache-2.0', 'weights': 'the data\'s terms'},
        citation={'software': 'allflax', 'papers': ['paper 1', 'paper 2'], 'data': ['data']},
        decision_rule={'kind': 'argmax', 'description': 'the class of highest probability', 'threshold': None,
                       'positive_class': None},
        checkpoint={'step': 3, 'chosen': 'named', 'how': 'the step named by --checkpoint_step (3)',
                    'saved_steps': [2, 3], 'best_validation_step': 2, 'validation_accuracy': 0.5})
    metadata['data'] = {'name': 'cnmc2019', 'synthetic': False, 'facts': sources.cnmc2019.FACTS.as_dict(),
                        'split': 'patient', 'fold': fold, 'skipped_images': 0,
                        'splits': {'test': {'images': 6, 'patients': 3, 'class_counts': {'all': 2, 'hem': 2,
                                                                                          'other': 2}}}}
    per_class = {name: {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'specificity': 0.5, 'support': 2}
                 for name in CLASSES}
    metadata['evaluation'] = {
        'split': 'test', 'checkpoint_step': 3, 'patient_level': None, 'calibration': {'ece': 0.1},
        'cell_level': {'num_examples': 6, 'accuracy': 0.5, 'f1_macro': 0.5, 'ci95': {}, 'per_class': per_class,
                       'confusion_matrix': [[1, 1, 0], [0, 1, 1], [1, 0, 1]]},
        'reliability_diagram': {'file': 'reliability.png', 'split': 'test', 'from': 'eval/test/predictions.csv',
                                'temperature': 1.0, 'bins': 15},
        'confident_errors': {'errors': 3, 'images': 6, 'thumbnails': 'none: real images',
                             'shown': [{'image_id': 'fold_0/all/UID_57_29_1_all.bmp', 'patient': '57',
                                        'label': 'all', 'predicted': 'hem', 'probability': 0.9,
                                        'thumbnail': None}]}}
    return metadata


def test_each_known_source_carries_its_published_facts():
    """The facts against /work/shared/DATA_FACTS.md (the data sets' published facts with their sources),
    typed here from it; unconfirmed ones keep their qualifier, unpublished ones read unknown."""
    cnmc, aria, idb = sources.cnmc2019.FACTS, sources.all_aria.FACTS, sources.all_idb2.FACTS
    assert cnmc.source.startswith('doi:10.7937/tcia.2019.dc64i46r') and cnmc.patients == '118 subjects'
    assert cnmc.images.startswith('15,135 (15,114 ') and 'final test 2,586, unlabelled' in cnmc.images
    assert cnmc.labels == 'ground truth marked by an expert oncologist'
    assert cnmc.citation[0].endswith('The Cancer Imaging Archive, 2019. doi:10.7937/tcia.2019.dc64i46r')
    assert cnmc.stain.startswith('unknown') and cnmc.stain.endswith('(unconfirmed)')
    assert cnmc.licence.startswith('unknown for C-NMC itself (unconfirmed)')
    assert cnmc.image_type.endswith('450×450 BMP (unconfirmed)') and 'not stated (unconfirmed)' in cnmc.specimen
    assert aria.patients == '89: 25 benign (hematogones), 64 ALL' and aria.images.startswith('3,256 (')
    assert aria.images.endswith('(unconfirmed))') and aria.source.startswith('doi:10.34740/KAGGLE/DSV/2175623')
    assert aria.specimen.startswith('peripheral blood smears') and aria.magnification == '100×'
    assert aria.stain == 'unknown (not named)' and 'do not distribute the database' in aria.licence
    assert aria.labels == 'types and subtypes set by a specialist using flow cytometry'
    assert aria.citation[1].endswith('doi:10.1002/int.22753')
    assert idb.patients == 'unknown (not published)' and idb.images == '260: 130 blasts, 130 normal (unconfirmed)'
    assert idb.specimen == 'peripheral blood' and idb.magnification == '300–500'
    assert 'Canon PowerShot G5' in idb.acquisition and idb.citation[0].endswith('doi:10.1109/ICIP.2011.6115881')
    for facts in (cnmc, aria, idb):
        assert facts.microns_per_pixel == 'unknown (not published)' and facts.fact_sources
        assert all(value for value in facts.as_dict().values())

    config = common.base_config(model='m', data='synthetic_cnmc', image_size=32, batch_size=1, num_epochs=1,
                                learning_rate=0.1)
    synthetic = sources.describe(config.data, seed=3)
    assert synthetic.specimen.startswith('none: synthetic') and synthetic.patients == '80 synthetic patients, ' \
                                                                                       'one class each'
    assert 'seed 3' in synthetic.acquisition and synthetic.images == '4000'
    config.data.name = 'image_folder'
    assert set(config.data.facts) == {*sources.facts.TEXT_FIELDS, 'citation'}  # Every field the user can state.
    mine = sources.describe(config.data, seed=0).as_dict()
    assert {key: mine[key] for key in sources.facts.TEXT_FIELDS} == dict.fromkeys(sources.facts.TEXT_FIELDS,
                                                                                   'unknown')
    assert mine['citation'] == [] and mine['fact_sources'] == ['stated by the user in the config (data.facts)']
    config.data.facts.stain = 'May-Grünwald-Giemsa'
    config.data.facts.citation = 'Me et al. 2026'
    mine = sources.describe(config.data, seed=0)
    assert (mine.stain, mine.citation, mine.specimen) == ('May-Grünwald-Giemsa', ('Me et al. 2026',), 'unknown')
    card = model_card.render(dict(card_metadata(), data=dict(card_metadata()['data'], name='image_folder',
                                                             facts=mine.as_dict())))
    assert '| Stain | May-Grünwald-Giemsa |' in card and '| Specimen | unknown |' in card
    assert 'Not published for this data set: specimen, acquisition, magnification, µm per pixel' in card


def test_the_schema_takes_the_card_fields_and_refuses_wrong_types():
    metadata = dict(card_metadata(fold={'index': 2, 'count': 5}), files={'reliability.png': '0' * 64})
    bundle.validate(metadata, 'x.json')
    bundle.validate(dict(metadata, decision_rule={'kind': 'threshold', 'description': 'all when p(all) >= 0.3',
                                                  'threshold': 0.3, 'positive_class': 'all'}), 'x.json')
    evaluation, data = metadata['evaluation'], metadata['data']
    error = evaluation['confident_errors']['shown'][0]
    for change, where in [
        ({'out_of_scope_uses': 'diagnosis'}, 'out_of_scope_uses'),
        ({'licence': {'code': 'Apache-2.0'}}, 'licence'),
        ({'decision_rule': {'kind': 'threshold', 'description': 'd', 'threshold': None, 'positive_class': 'all'}},
         'decision_rule/threshold'),
        ({'decision_rule': {'kind': 'top-2', 'description': 'd'}}, 'decision_rule/kind'),
        ({'checkpoint': dict(metadata['checkpoint'], chosen='best')}, 'checkpoint/chosen'),
        ({'data': dict(data, facts=dict(data['facts'], patients=118))}, 'data/facts/patients'),
        ({'data': dict(data, facts=dict(data['facts'], stain=''))}, 'data/facts/stain'),
        ({'data': dict(data, facts={k: v for k, v in data['facts'].items() if k != 'licence'})}, 'data/facts'),
        ({'data': dict(data, fold={'index': 2})}, 'data/fold'),
        ({'data': dict(data, fold=2)}, 'data/fold'),
        ({'evaluation': dict(evaluation, reliability_diagram={'file': '/tmp/reliability.png', 'split': 'test'})},
         'evaluation'),
        ({'evaluation': dict(evaluation, confident_errors=dict(
            evaluation['confident_errors'], shown=[dict(error, probability='high')]))}, 'evaluation'),
        ({'evaluation': dict(evaluation, confident_errors=dict(
            evaluation['confident_errors'], shown=[dict(error, thumbnail='../error.png')]))}, 'evaluation'),
    ]:
        with pytest.raises(bundle.BundleError, match=f'^x.json: not a valid bundle metadata.json at {where}'):
            bundle.validate(dict(metadata, **change), 'x.json')


def test_the_card_answers_the_checklists_from_its_metadata():
    card = model_card.render(card_metadata())
    assert '| Patients (as published) | 118 subjects |' in card
    assert '| Source | doi:10.7937/tcia.2019.dc64i46r (The Cancer Imaging Archive) |' in card
    assert '| Stain | unknown: not stated for C-NMC' in card and '(unconfirmed)' in card
    assert ('- Checkpoint: step 3 of the run `run`, exported as the step named by --checkpoint_step (3). Saved '
            'steps: 2, 3; the best by validation accuracy is step 2.') in card
    assert '- Decision rule: argmax, the class of highest probability; no threshold.' in card
    assert '| all | 1 | 1 | 0 |\n| hem | 0 | 1 | 1 |\n| other | 1 | 0 | 1 |' in card  # Rows: true classes.
    assert '| `fold_0/all/UID_57_29_1_all.bmp` | 57 | all | hem | 0.900 | – |' in card
    assert '![reliability.png](reliability.png)' in card
    assert '### Out of scope: do not use it for\n\n- diagnosis' in card and '- Cite the data:\n  - data' in card
    assert 'k-fold' not in card and 'fold 0 of' not in card
    threshold = dict(card_metadata(), decision_rule={'kind': 'threshold', 'description': 'chosen on val',
                                                     'threshold': 0.3, 'positive_class': 'all'})
    assert '- Decision rule: a threshold of 0.3 on the probability of `all`: chosen on val.' in \
        model_card.render(threshold)


def test_the_card_of_a_fold_names_it_and_reads_for_it():
    card = model_card.render(card_metadata(fold={'index': 2, 'count': 5}))
    assert card.startswith('# Model card: tiny (all, hem, other), fold 2 of 5\n')
    assert ('k-fold by patient: this model is fold 2 of 5 (data.fold=2, folds numbered 0–4). Its test split is that '
            'fold; train and val come from the other 4 folds.') in card
    assert 'The test split (fold 2 of 5; 6 images), step 3.' in card
    assert "One fold of a k-fold run (fold 2 of 5): its scores are of this fold's test patients only" in card
    assert 'The split is by' not in card  # A fold of a patient split is a patient split.


def test_a_reliability_diagram_is_hashed_and_checked_as_every_file(tmp_path):
    directory = tmp_path / 'bundle'
    directory.mkdir()
    write_model(str(directory / bundle.ONNX))
    (directory / bundle.STABLEHLO).write_bytes(b'x')
    png = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    (directory / 'reliability.png').write_bytes(png)
    bundle.finish(str(directory), card_metadata(), model_card.render(card_metadata()))
    metadata = bundle.read_metadata(str(directory))
    assert metadata['files']['reliability.png'] == hashlib.sha256(png).hexdigest()
    (directory / 'reliability.png').write_bytes(png + b'\0')
    with pytest.raises(bundle.BundleError, match='reliability.png has changed since export'):
        bundle.read_metadata(str(directory))


def test_a_threshold_rule_decides_the_class_and_is_named(tmp_path):
    """A binary operating point: the positive class where its probability reaches the threshold
    (argmax would say otherwise for one image here), named in each row of the predictions CSV."""
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4]])
    rule = {'kind': 'threshold', 'threshold': 0.4, 'positive_class': 'all', 'description': 'd'}
    # Positive 'all' is column 1 here only if named so: classes (hem, all).
    expected = ['hem', 'hem', 'all', 'all', 'all']  # By hand: p(all) >= 0.4.
    predicted = image_files.predicted_classes(probabilities, ['hem', 'all'], rule)
    assert [['hem', 'all'][k] for k in predicted] == expected
    assert [['hem', 'all'][k] for k in image_files.predicted_classes(probabilities, ['hem', 'all'], None)] == \
        ['hem', 'hem', 'hem', 'all', 'hem']
    flipped = dict(rule, positive_class='hem', threshold=0.6)  # The positive class first.
    assert [['hem', 'all'][k] for k in image_files.predicted_classes(probabilities, ['hem', 'all'], flipped)] == \
        ['hem', 'hem', 'all', 'all', 'hem']
    output = str(tmp_path / 'preds.csv')
    image_files.write_predictions(output, list('abcde'), ['hem', 'all'], probabilities, rule)
    with open(output, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['path', 'predicted_class', 'hem', 'all', 'decision_rule']
    assert [row[1] for row in rows[1:]] == expected and {row[-1] for row in rows[1:]} == {'threshold 0.4 on all'}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a bundle's predictor must run without: each is made unimportable for predict.py's runs here.
NOT_IN_A_BUNDLE = ('allflax', 'jax', 'jaxlib', 'flax', 'orbax', 'grain', 'tensorflow', 'jsonschema', 'configs')


def without_allflax(tmp_path) -> dict:
    """An environment whose PYTHONPATH shadows allflax, JAX and the rest with packages that refuse to
    be imported: a run that imports any of them fails, naming it."""
    poisoned = tmp_path / 'poisoned'
    for name in NOT_IN_A_BUNDLE:
        (poisoned / name).mkdir(parents=True)
        (poisoned / name / '__init__.py').write_text(f'raise ImportError("the bundle imported {name}")\n')
    return dict(os.environ, PYTHONPATH=str(poisoned))


def run_predict_py(directory, *args, cwd, python=sys.executable, env=None):
    """`python BUNDLE/predict.py ARGS` in a fresh process, from `cwd`."""
    return subprocess.run([python, os.path.join(directory, 'predict.py'), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_bundled_predictor_is_allflax_code_with_its_imports_pointed_at_the_bundle(tiny_bundle):
    """Each bundled module is its allflax module line for line, after a header naming it and the
    commit; the only lines that differ are `from allflax... import` lines, which import the bundle's copies."""
    origins = {'predict.py': 'allflax/deploy/predictor.py', 'files.py': 'allflax/files.py',
               'preprocess.py': 'allflax/data/preprocess.py', 'image_files.py': 'allflax/data/image_files.py'}
    for name, origin in origins.items():
        with open(os.path.join(tiny_bundle, name)) as f:
            bundled = f.read().splitlines()
        with open(os.path.join(ROOT, origin)) as f:
            original = f.read().splitlines()
        header, body = bundled[:len(bundled) - len(original)], bundled[len(bundled) - len(original):]
        assert header[:2] == [f"# {name} of this bundle: {origin}, written by allflax's --mode=export at",
                              '# commit test: the code of allflax itself, unchanged but for its "from allflax...']
        assert len(header) == 4 and all(line.startswith('# ') for line in header)
        expected = [(line, 'import ' + line.split(' import ', 1)[1])
                    for line in original if line.startswith('from allflax')]
        assert [(a, b) for a, b in zip(original, body) if a != b] == expected
    assert open(os.path.join(tiny_bundle, 'requirements.txt')).read().splitlines()[2:] == [
        'numpy==2.4.6', 'opencv-python-headless==5.0.0.93', 'onnxruntime==1.32.0']  # As requirements.txt pins them.
    assert read_json(os.path.join(tiny_bundle, 'metadata.json'))['predictor']['modules'] == [
        'files.py', 'image_files.py', 'preprocess.py']


def test_export_refuses_a_predictor_module_that_imports_beyond_the_bundle(tmp_path, monkeypatch):
    def module(source):
        path = tmp_path / f'extra{len(list(tmp_path.iterdir()))}.py'
        path.write_text(source)
        extra = importlib.util.module_from_spec(importlib.util.spec_from_file_location(path.stem, path))
        monkeypatch.setitem(bundle.PREDICTOR_MODULES, extra, 'extra.py')
        return extra

    for source, refused in [('import os\nimport jax\n', 'imports jax, which a bundle'),
                            ('def f():\n    from jsonschema import validators\n', 'imports jsonschema, which'),
                            ('from allflax.evaluation import calibration\n', 'imports what a bundle does not carry '
                                                                             r'\(from allflax.evaluation import'),
                            ('import allflax.files\n', 'imports what a bundle does not carry'),
                            ('from . import files\n', 'imports , which')]:
        with pytest.raises(RuntimeError, match=f'extra.*\\.py {refused}.*; no bundle written$'):
            bundle.bundled_source(module(source), 'test')
    assert bundle.bundled_source(module('import cv2\nfrom allflax import files\n'), 'test').endswith(
        '\nimport cv2\nimport files\n')


def test_predict_py_runs_alone_from_any_directory_as_the_allflax_cli(tiny_bundle, tmp_path):
    """predict.py, from another directory, with allflax, JAX and jsonschema unimportable: the same
    CSVs, byte for byte, as `python -m allflax.deploy.bundle`, and the numpy reference's probabilities."""
    cells = str(tmp_path / 'cells')
    paths = write_cells(cells)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    run = run_predict_py(tiny_bundle, f'--input={cells}', '--output=out/preds.csv', '--batch_size=2',
                         cwd=elsewhere, env=without_allflax(tmp_path))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {'output': 'out/preds.csv', 'predicted': 5, 'unreadable': 1,
                                      'errors': 'out/preds.errors.csv', 'checkpoint_step': 3, 'precision': 'float32'}
    assert run.stderr.splitlines() == [f'unreadable: {cells}/broken.png: not a decodable image (truncated, corrupt or '
                                       'not an image)']
    assert set(os.listdir(tiny_bundle)) == {'metadata.json', *read_json(os.path.join(tiny_bundle,
                                                                                      'metadata.json'))['files']}
    bundle.main([f'--bundle={tiny_bundle}', f'--input={cells}', f'--output={tmp_path / "cli.csv"}'])
    for suffix in ('.csv', '.errors.csv'):
        assert (elsewhere / 'out' / f'preds{suffix}').read_bytes() == (tmp_path / f'cli{suffix}').read_bytes()
    with open(elsewhere / 'out' / 'preds.csv', newline='') as f:
        rows = list(csv.reader(f))[1:]
    tiles = np.stack([preprocess.preprocess(preprocess.read_image(p), STEPS, SIZE) for p in paths])
    assert [row[0] for row in rows] == paths
    np.testing.assert_allclose(np.float64([row[2:-1] for row in rows]), reference_probabilities(tiles), atol=1e-6)


def tree_of(folder):
    return sorted((root, tuple(sorted(names))) for root, _, names in os.walk(folder))


def test_predict_py_refuses_a_changed_bundle_by_name_in_one_line_and_writes_nothing(tiny_bundle, tmp_path):
    cells = str(tmp_path / 'cells')
    write_cells(cells, count=1)
    metadata = read_json(os.path.join(tiny_bundle, 'metadata.json'))
    env = without_allflax(tmp_path)

    def refused(message):
        before = tree_of(tmp_path)
        run = run_predict_py(tiny_bundle, f'--input={cells}', f'--output={tmp_path / "p.csv"}', cwd=tmp_path, env=env)
        assert (run.returncode, run.stdout, run.stderr.splitlines()) == (1, '', [f'error: {message}'])
        assert tree_of(tmp_path) == before

    changed = 'has changed since export: its SHA-256 is not the one metadata.json holds; export the bundle again'
    for name, change in [('preprocess.py', b'\n# an edit\n'), ('image_files.py', b'\nraise SystemExit(3)\n'),
                         ('model.onnx', b'\0'), ('requirements.txt', b'jax\n')]:
        path = os.path.join(tiny_bundle, name)
        original = open(path, 'rb').read()
        with open(path, 'ab') as f:
            f.write(change)
        refused(f'{path} {changed}')  # Its modules before they are imported: a changed one never runs.
        with open(path, 'wb') as f:
            f.write(original)
    os.remove(os.path.join(tiny_bundle, 'files.py'))
    refused(f'{tiny_bundle}/files.py is missing from the bundle (metadata.json lists it)')
    with open(os.path.join(tiny_bundle, 'metadata.json'), 'w') as f:
        json.dump(dict(metadata, schema_version=2), f)
    refused(f'{tiny_bundle}/metadata.json: schema version 2 is not one this allflax reads (1); export the bundle '
            'again, or read it with the allflax that wrote it')
    with open(os.path.join(tiny_bundle, 'metadata.json'), 'w') as f:
        json.dump(dict(metadata, input=dict(metadata['input'], size='8')), f)
    refused(f'{tiny_bundle}/metadata.json: not a valid bundle metadata.json at input/size: expected a int; export the '
            'bundle again')


def test_the_bundled_preprocessing_gives_training_tiles_bit_for_bit(tiny_bundle, tmp_path):
    """The bundle's own image_files and preprocess (as predict.py imports them, without allflax) on
    synthetic smear cells saved as PNG and JPEG, square and not, against training's
    `preprocess.preprocess(preprocess.read_image(path))`: each step alone and all four."""
    cells = fake_trees.generated_cells('synthetic_all4', count_per_class=1, size=48, seed=0)
    paths = []
    for i, cell in enumerate(cell for per_class in cells for cell in per_class):
        for extension, image in (('png', cell), ('jpg', cell[:, 7:]), ('png', cell[5:, :40])):
            paths.append(fake_trees.write_image(str(tmp_path / 'cells' / f'cell{i}_{image.shape[1]}.{extension}'),
                                                image))
    step_lists = {'resize_pad': ['resize_pad'], 'clahe': ['clahe'], 'roi_crop': ['roi_crop'], 'lab': ['lab'],
                  'all': ['roi_crop', 'clahe', 'resize_pad', 'lab']}
    script = (f'import sys\nimport numpy as np\nsys.path.insert(0, {tiny_bundle!r})\nimport image_files\n'
              f'tiles = {{}}\nfor name, steps in {step_lists!r}.items():\n'
              f'    read, readable, errors = image_files.read_tiles({paths!r}, steps, {SIZE * 4})\n'
              f'    assert readable == {paths!r} and errors == [], errors\n'
              f'    tiles[name] = np.stack(read)\nnp.savez({str(tmp_path / "tiles.npz")!r}, **tiles)\n')
    run = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=without_allflax(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    bundled = np.load(tmp_path / 'tiles.npz')
    for name, steps in step_lists.items():
        training = np.stack([preprocess.preprocess(preprocess.read_image(p), steps, SIZE * 4) for p in paths])
        assert bundled[name].dtype == np.uint8 and bundled[name].shape == (len(paths), SIZE * 4, SIZE * 4, 3)
        np.testing.assert_array_equal(bundled[name], training, err_msg=name)
        if name != 'resize_pad':  # Each step changes the tiles: the comparison would catch a step left out.
            assert (bundled[name] != bundled['resize_pad']).any(axis=(1, 2, 3)).all(), name
