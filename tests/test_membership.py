"""A run's splits are part of the run: training records each split's members in splits.json, and a
resume, eval, export and compare use exactly those, or refuse in one line naming what changed.

Most cases call `pipeline.load` with the recorded splits.json, as the modes do; one drives main.py's
--mode=eval and one a resume, to show that they refuse before writing anything.
"""
import csv
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from absl import flags

import main
from allflax.data import cache, membership, pipeline, preprocess
from allflax.data.dataset import read_splits_json
from allflax.data.sources import fake_trees, synthetic
from allflax.modes import compare
from allflax.training import loop
from configs import vgg19_mhsa

SIZE = 32
PATIENTS = 40
EVAL = ['val', 'test']  # What --mode=eval needs of a run: its split, and val for the temperature.


def _write_patients_csv(root, rows):
    with open(os.path.join(root, 'patients.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(('path', 'patient'))
        writer.writerows(rows)


def _rows(root):
    with open(os.path.join(root, 'patients.csv'), newline='') as f:
        return [(row['path'], row['patient']) for row in csv.DictReader(f)]


def _config(data_dir, cache_dir, seed=0):
    config = vgg19_mhsa.get_config()
    with config.unlocked():
        config.data.update(name='image_folder', dir=str(data_dir), cache_dir=str(cache_dir), image_size=SIZE)
        config.seed = seed
    return config


@pytest.fixture(scope='module')
def probe(tmp_path_factory):
    """The issue's probe, trained as far as its splits: an image_folder set of 40 patients P000..P039
    (one cell each, blast and normal alternating, patients.csv), split into `work`; P040's cell kept
    aside to be added later."""
    base = tmp_path_factory.mktemp('probe')
    root = str(base / 'cells')
    cells = fake_trees.generated_cells('synthetic_cnmc', PATIENTS // 2 + 1, SIZE, 0)
    rows = []
    for patient in range(PATIENTS + 1):
        label = patient % 2
        path = f'{("normal", "blast")[label]}/P{patient:03d}.png'
        fake_trees.write_image(os.path.join(str(base / 'spare' if patient == PATIENTS else root), path),
                               cells[label][patient // 2])
        rows.append((path, f'P{patient:03d}'))
    _write_patients_csv(root, rows[:-1])
    work = str(base / 'work')
    os.makedirs(work)
    pipeline.load(_config(root, base / 'cache'), work)
    return {'root': root, 'cache': str(base / 'cache'), 'work': work, 'recorded': read_splits_json(work),
            'spare': (str(base / 'spare' / rows[-1][0]), rows[-1])}


def _copy(probe, tmp_path):
    """The probe's data, to change: a copy with the files' times kept, so its cache is the probe's."""
    root = str(tmp_path / 'cells')
    shutil.copytree(probe['root'], root)
    return root


def _load(probe, root, needed=EVAL, action='evaluate', recorded=None):
    return pipeline.load(_config(root, probe['cache']), recorded=recorded or probe['recorded'], run='W',
                         needed=needed, action=action)


def _refusal(probe, root, **kwargs):
    with pytest.raises(membership.SplitsChanged) as error:
        _load(probe, root, **kwargs)
    message = str(error.value)
    assert '\n' not in message
    return message


def _add_p040(probe, root):
    source, row = probe['spare']
    shutil.copy(source, os.path.join(root, row[0]))
    _write_patients_csv(root, [*_rows(root), row])


def test_training_records_each_member_with_its_file_hash_class_and_patient(probe):
    recorded = probe['recorded']
    assert recorded['class_names'] == ['blast', 'normal']  # The sorted folders.
    members = recorded['members']
    assert members['kind'] == 'files' and members['left_out'] == []
    patient_of = dict(_rows(probe['root']))
    listed = []
    for name in ('train', 'val', 'test'):
        split = members['splits'][name]
        assert len(split) == recorded[name]['num_examples']
        assert sorted({m['patient'] for m in split}) == recorded[name]['patients']  # The summary, kept.
        for member in split:
            with open(os.path.join(probe['root'], member['path']), 'rb') as f:
                assert member['sha256'] == hashlib.sha256(f.read()).hexdigest()
            assert member['label'] == member['path'].split('/')[0] and member['patient'] == patient_of[member['path']]
            listed.append(member['path'])
    assert sorted(listed) == sorted(patient_of)


def test_the_issues_probe_an_added_patient_leaves_the_test_set_as_recorded(probe, tmp_path, monkeypatch, caplog):
    root = _copy(probe, tmp_path)
    _add_p040(probe, root)
    recomputed = pipeline.load(_config(root, tmp_path / 'cache'))
    recorded_test = probe['recorded']['test']['patients']
    # Without the record, the one added patient reshuffles the others: the failure the issue measured.
    assert sorted(set(recomputed.splits['test'].patients)) != recorded_test
    monkeypatch.setattr(cache.AllflaxTiles, '_generate_examples', lambda *a: pytest.fail('the cache was rebuilt'))
    dataset = _load(probe, root)
    assert set(dataset.splits) == set(EVAL) and dataset.class_names == ('blast', 'normal')
    test = dataset.splits['test']
    assert sorted(set(test.patients)) == recorded_test
    members = probe['recorded']['members']['splits']['test']
    assert list(test.paths) == [os.path.join(root, m['path']) for m in members]  # In the recorded order.
    assert [dataset.class_names[label] for label in test.labels] == [m['label'] for m in members]
    for i, member in enumerate(members):  # Tiles of the very files, from the training cache.
        expected = preprocess.preprocess(preprocess.read_image(os.path.join(root, member['path'])),
                                         ('resize_pad',), SIZE)
        np.testing.assert_array_equal(test.images[i], expected)
    assert any('1 file in none of run W\'s splits: ignored' in r.getMessage() for r in caplog.records)


def test_a_missing_test_file_is_refused_and_a_missing_train_file_only_for_a_resume(probe, tmp_path, caplog):
    root = _copy(probe, tmp_path)
    members = probe['recorded']['members']['splits']
    train_file = members['train'][0]['path']
    os.remove(os.path.join(root, train_file))
    _write_patients_csv(root, [row for row in _rows(root) if row[0] != train_file])
    assert len(_load(probe, root).splits['test']) == probe['recorded']['test']['num_examples']
    assert any(f"splits that evaluate does not use: 1 train file missing: {train_file}" in r.getMessage()
               for r in caplog.records)
    assert _refusal(probe, root, needed=['train', 'val', 'test'], action='resume') == (
        f"data.dir={root} differs from run W's splits: 1 train file missing: {train_file}; refusing to resume: "
        f"use the data the run was trained on, or train a new run on today's data")
    gone = [m['path'] for m in members['test'][:4]]
    for path in gone:
        os.remove(os.path.join(root, path))
    _write_patients_csv(root, [row for row in _rows(root) if row[0] not in gone])
    assert f'4 test files missing: {", ".join(gone[:3])} and 1 more; refusing to evaluate' in _refusal(probe, root)


def test_a_renamed_test_file_and_a_new_file_are_named(probe, tmp_path):
    root = _copy(probe, tmp_path)
    old = probe['recorded']['members']['splits']['test'][0]['path']
    new = old.replace('.png', '_renamed.png')
    os.rename(os.path.join(root, old), os.path.join(root, new))
    _add_p040(probe, root)
    _write_patients_csv(root, [(new if path == old else path, patient) for path, patient in _rows(root)])
    assert _refusal(probe, root) == (
        f"data.dir={root} differs from run W's splits: 1 file added, not in the run's splits (ignored); "
        f"1 test file renamed: {old} -> {new}; refusing to evaluate: use the data the run was trained on, "
        f"or train a new run on today's data")


def test_changed_content_and_another_patient_are_refused(probe, tmp_path):
    root = _copy(probe, tmp_path)
    val = probe['recorded']['members']['splits']['val']
    changed, moved = val[0], val[1]
    fake_trees.write_image(os.path.join(root, changed['path']), np.zeros((SIZE, SIZE, 3), np.uint8))
    _write_patients_csv(root, [(path, 'P999' if path == moved['path'] else patient) for path, patient in _rows(root)])
    caches = os.listdir(os.path.join(probe['cache'], 'tiles'))
    message = _refusal(probe, root)
    assert f"1 val file with another patient: {moved['path']} ({moved['patient']} -> P999)" in message
    assert f"1 val file changed content: {changed['path']}" in message
    assert os.listdir(os.path.join(probe['cache'], 'tiles')) == caches  # Refused before a cache was built.


def test_class_folders_come_from_the_run(probe, tmp_path):
    root = _copy(probe, tmp_path)
    # A new class folder: its files are in no split and the classes stay the run's.
    fake_trees.write_image(os.path.join(root, 'artefact', 'a.png'), np.full((SIZE, SIZE, 3), 7, np.uint8))
    _write_patients_csv(root, [*_rows(root), ('artefact/a.png', 'P100')])
    dataset = _load(probe, root, needed=['train', 'val', 'test'], action='resume')
    assert dataset.class_names == ('blast', 'normal')
    assert sum(len(split) for split in dataset.splits.values()) == PATIENTS
    # A class folder renamed: its members are missing, under another class.
    shutil.move(os.path.join(root, 'normal'), os.path.join(root, 'hem'))
    _write_patients_csv(root, [(path.replace('normal/', 'hem/'), patient) for path, patient in _rows(root)])
    message = _refusal(probe, root)
    assert "classes differ: artefact, hem not the run's; normal gone" in message
    test_normal = [m['path'] for m in probe['recorded']['members']['splits']['test'] if m['label'] == 'normal']
    assert f'{len(test_normal)} test files renamed: {test_normal[0]} -> {test_normal[0].replace("normal/", "hem/")}' \
        in message


def test_a_splits_json_without_members_is_recomputed_and_checked(probe, tmp_path, caplog):
    old_format = {key: value for key, value in probe['recorded'].items() if key not in ('members', 'class_names')}
    root = _copy(probe, tmp_path)
    dataset = _load(probe, root, recorded=old_format)
    assert sorted(set(dataset.splits['test'].patients)) == probe['recorded']['test']['patients']
    assert any('records no members' in r.getMessage() for r in caplog.records)
    _add_p040(probe, root)
    recomputed = pipeline.load(_config(root, probe['cache']))
    message = _refusal(probe, root, recorded=old_format)
    assert message.startswith("run W's splits.json records no members (written before allflax recorded them) and "
                              f"the splits recomputed from data.dir={root} differ from it: ")
    for name in EVAL:
        now, was = set(recomputed.splits[name].patients), set(probe['recorded'][name]['patients'])
        if now != was:
            assert f'{name} patients differ ({len(now - was)} new one' in message
            assert f'{len(was - now)} gone: {", ".join(sorted(was - now)[:3])}' in message
    assert 'test patients differ' in message


def test_synthetic_runs_record_generated_ids_and_refuse_another_set(make_tiny_config, tmp_path):
    config = make_tiny_config()
    work = str(tmp_path / 'work')
    os.makedirs(work)
    trained = pipeline.load(config, work)
    recorded = read_splits_json(work)
    generated = recorded['members']['generated']
    assert generated == {'name': 'synthetic_all4', 'num_images': 192, 'image_size': 32, 'num_patients': 16,
                         'seed': 0, 'generator_version': synthetic.GENERATOR_VERSION}
    ids = recorded['members']['splits']['test']
    data = synthetic.generate('synthetic_all4', num_images=192, image_size=32, num_patients=16,
                                               seed=0)
    np.testing.assert_array_equal(trained.splits['test'].images, data.images[ids])  # Ids into the generated set.
    again = pipeline.load(config, recorded=recorded, run='W', needed=['test'])
    np.testing.assert_array_equal(again.splits['test'].images, trained.splits['test'].images)
    with config.unlocked():
        config.seed = 1
    with pytest.raises(membership.SplitsChanged, match=r"^the synthetic set these settings generate differs from run "
                                                       r"W's: seed 1 \(the run's 0\); refusing to export"):
        pipeline.load(config, recorded=recorded, run='W', needed=['test'], action='export')


def test_compare_refuses_runs_tested_on_different_members(probe, tmp_path):
    runs = []
    for seed in (0, 0, 1):
        work = str(tmp_path / f'run{len(runs)}')
        os.makedirs(work)
        pipeline.load(_config(probe['root'], probe['cache'], seed=seed), work)
        runs.append(work)
    members = [read_splits_json(w)['members']['splits']['test'] for w in runs]
    paths = [{m['path'] for m in split} for split in members]
    expected = len(paths[0] ^ paths[2])
    assert expected > 0
    with pytest.raises(membership.SplitsChanged) as error:
        compare.compare([runs[0], runs[2]], 'test', str(tmp_path / 'out'))
    assert str(error.value).startswith(f'runs {runs[0]} and {runs[2]} have different test members '
                                       f'({len(members[0])} and {len(members[2])}; {expected} in one run')
    with pytest.raises(FileNotFoundError, match='predictions.csv not found'):  # Same members: on to the scores.
        compare.compare(runs[:2], 'test', str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


def _workdir_of_a_run(probe, tmp_path, root):
    """A run's workdir as training leaves it before its first checkpoint: config.json and splits.json."""
    work = str(tmp_path / 'run')
    shutil.copytree(probe['work'], work)
    config = loop.resolve_input_convention(_config(root, probe['cache']))  # As training writes it.
    with open(os.path.join(work, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=1))
    return config, work


def _a_run_whose_data_lost_a_file(probe, tmp_path, split):
    """A copy of the probe's data without the first file of the run's `split` (patients.csv too),
    the run's workdir, and a snapshot of it: (config, work, root, the file gone, snapshot)."""
    root = _copy(probe, tmp_path)
    config, work = _workdir_of_a_run(probe, tmp_path, root)
    gone = probe['recorded']['members']['splits'][split][0]['path']
    os.remove(os.path.join(root, gone))
    _write_patients_csv(root, [row for row in _rows(root) if row[0] != gone])
    return config, work, root, gone, _snapshot(work)


def test_eval_refuses_in_one_line_and_writes_nothing(probe, tmp_path, capsys):
    _, work, root, gone, before = _a_run_whose_data_lost_a_file(probe, tmp_path, 'test')
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['main.py', '--mode=eval', f'--workdir={work}'])
    with pytest.raises(SystemExit) as exit_code:
        main.main(['main.py'])
    assert exit_code.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert lines == [f"error: data.dir={root} differs from run {work}'s splits: 1 test file missing: {gone}; "
                     f"refusing to evaluate: use the data the run was trained on, or train a new run on today's data"]
    assert _snapshot(work) == before


def test_a_resume_refuses_before_any_file_changes(probe, tmp_path):
    config, work, _, gone, before = _a_run_whose_data_lost_a_file(probe, tmp_path, 'train')
    with pytest.raises(membership.SplitsChanged, match=f"1 train file missing: {gone}; refusing to resume"):
        loop.train_and_evaluate(config, work)
    assert _snapshot(work) == before
    with open(os.path.join(work, 'splits.json')) as f:
        assert json.load(f) == probe['recorded']


def test_official_split_records_the_patients_it_left_out(tmp_path):
    tree = fake_trees.make_cnmc_tree(str(tmp_path / 'cnmc'), patients_per_class=3, images_per_patient=2, size=SIZE)
    # Patient 4 of the official test set also has an image in a training fold.
    cell = fake_trees.generated_cells('synthetic_cnmc', 1, SIZE, 5)[1][0]
    extra = os.path.join('training_data', 'fold_0', 'all', 'UID_4_9_1_all.bmp')
    fake_trees.write_image(os.path.join(tree, extra), cell)
    config = vgg19_mhsa.get_config()
    with config.unlocked():
        config.data.update(name='cnmc2019', dir=tree, cache_dir=str(tmp_path / 'cache'), image_size=SIZE,
                           split='official')
    work = str(tmp_path / 'work')
    os.makedirs(work)
    dataset = pipeline.load(config, work)
    recorded = read_splits_json(work)
    assert recorded['removed_overlap'] == {'patients': ['4'], 'images': [extra.replace(os.sep, '/')]}
    assert '4' in recorded['test']['patients']
    assert '4' not in recorded['train']['patients'] + recorded['val']['patients']
    assert recorded['members']['left_out'] == [extra.replace(os.sep, '/')]
    assert not any(path.endswith('UID_4_9_1_all.bmp') for split in dataset.splits.values() for path in split.paths)
    # Neither added nor missing when the run is used again.
    again = pipeline.load(config, recorded=recorded, run='W', needed=['train', 'val', 'test'], action='resume')
    assert {name: len(split) for name, split in again.splits.items()} == {
        name: recorded[name]['num_examples'] for name in ('train', 'val', 'test')}
