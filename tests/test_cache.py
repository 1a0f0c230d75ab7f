"""Real data sets end to end on fake trees: the tile cache (reuse, rebuild, interrupted builds),
unreadable images, splits.json and the near-duplicate audit."""
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from absl import flags

from allflax.data import cache, pipeline, prepared, preprocess
from allflax.data.sources import fake_trees
from configs import vgg19_mhsa

SIZE = 32


def _config(name, data_dir, cache_dir, **data):
    config = vgg19_mhsa.get_config()
    with config.unlocked():
        config.data.update(name=name, dir=data_dir, cache_dir=str(cache_dir), image_size=SIZE, **data)
    return config


def _complete_caches(cache_dir):
    return glob.glob(os.path.join(str(cache_dir), 'tiles', '*', 'allflax_tiles', '1.0.0'))


def _forbid_building(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('the cache was rebuilt')
    monkeypatch.setattr(cache.AllflaxTiles, '_generate_examples', fail)


@pytest.fixture(scope='module')
def cnmc_tree(tmp_path_factory):
    return fake_trees.make_cnmc_tree(str(tmp_path_factory.mktemp('cnmc')), patients_per_class=4,
                                     images_per_patient=2, size=SIZE, test_patients_per_class=1)


def test_cnmc_official_split_reads_tiles_from_the_cache(cnmc_tree, tmp_path):
    config = _config('cnmc2019', cnmc_tree, tmp_path / 'cache', split='official')
    dataset = pipeline.load(config, str(tmp_path / 'work'))
    assert dataset.class_names == ('hem', 'all')
    summary = json.load(open(tmp_path / 'work' / 'splits.json'))
    assert summary['test'] == {'num_examples': 4, 'patients': ['5', 'H5'], 'class_counts': {'hem': 2, 'all': 2}}
    assert summary['skipped'] == [] and 'near_duplicates' not in summary
    assert sum(summary[name]['num_examples'] for name in ('train', 'val', 'test')) == 20
    patient_sets = [set(summary[name]['patients']) for name in ('train', 'val', 'test')]
    assert len(set().union(*patient_sets)) == sum(map(len, patient_sets)) == 10
    for split in dataset.splits.values():
        for index in range(len(split)):
            tile = split.images[index]
            assert tile.dtype == np.uint8 and tile.shape == (SIZE, SIZE, 3)
            expected = preprocess.preprocess(preprocess.read_image(split.paths[index]), ('resize_pad',), SIZE)
            np.testing.assert_array_equal(tile, expected)
    train = dataset.splits['train']
    assert [os.path.basename(os.path.dirname(path)) for path in train.paths] == [
        dataset.class_names[label] for label in train.labels]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(train.images))[3], train.images[3])


def test_unchanged_rerun_reuses_the_cache_and_a_change_rebuilds_it(cnmc_tree, tmp_path, monkeypatch):
    config = _config('cnmc2019', cnmc_tree, tmp_path / 'cache')
    first = pipeline.load(config).splits['train'].images[0]
    with monkeypatch.context() as patch:
        _forbid_building(patch)
        np.testing.assert_array_equal(pipeline.load(config).splits['train'].images[0], first)
        with config.unlocked():
            config.seed = 3  # Another split of the same tiles: still no rebuild.
        pipeline.load(config)
        with config.unlocked():
            config.data.preprocess = ('resize_pad', 'clahe')
        with pytest.raises(AssertionError, match='rebuilt'):
            pipeline.load(config)
    assert len(_complete_caches(tmp_path / 'cache')) == 1
    pipeline.load(config)
    assert len(_complete_caches(tmp_path / 'cache')) == 2


def test_a_changed_source_file_rebuilds(tmp_path, monkeypatch):
    root = fake_trees.make_all_idb2_tree(str(tmp_path / 'data'), images_per_class=3, size=SIZE)
    config = _config('all_idb2', root, tmp_path / 'cache')
    pipeline.load(config)
    image = os.path.join(root, 'img', 'Im001_1.tif')
    fake_trees.write_image(image, np.zeros((SIZE, SIZE + 8, 3), np.uint8))
    _forbid_building(monkeypatch)
    with pytest.raises(AssertionError, match='rebuilt'):
        pipeline.load(config)


def test_failed_build_is_not_taken_as_complete(cnmc_tree, tmp_path, monkeypatch):
    config = _config('cnmc2019', cnmc_tree, tmp_path / 'cache')
    calls = []

    def fail_on_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError('simulated failure mid-build')
        return original(*args)
    original = preprocess.preprocess
    with monkeypatch.context() as patch:
        patch.setattr(preprocess, 'preprocess', fail_on_the_fifth)
        with pytest.raises(RuntimeError, match='simulated failure'):
            pipeline.load(config)
    assert _complete_caches(tmp_path / 'cache') == []
    assert len(pipeline.load(config).splits['train']) > 0
    assert len(_complete_caches(tmp_path / 'cache')) == 1


def test_killed_build_is_not_taken_as_complete(cnmc_tree, tmp_path):
    """A process killed mid-build (no clean-up runs) leaves only an incomplete folder."""
    script = textwrap.dedent(f"""
        import os
        from allflax.data import pipeline, preprocess
        from tests.test_cache import _config
        calls, original = [], preprocess.preprocess
        def die_on_the_fifth(*args):
            calls.append(1)
            if len(calls) == 5:
                os._exit(9)
            return original(*args)
        preprocess.preprocess = die_on_the_fifth
        pipeline.load(_config('cnmc2019', {cnmc_tree!r}, {str(tmp_path / 'cache')!r}))
    """)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([repository, os.path.join(repository, 'tests')])}
    assert subprocess.run([sys.executable, '-c', script], env=env, cwd=repository).returncode == 9
    assert glob.glob(os.path.join(str(tmp_path / 'cache'), 'tiles', '*', 'allflax_tiles', 'incomplete.*'))
    assert _complete_caches(tmp_path / 'cache') == []
    assert len(pipeline.load(_config('cnmc2019', cnmc_tree, tmp_path / 'cache')).splits['test']) > 0


def test_unreadable_images_are_all_listed_then_skipped_when_asked(tmp_path, monkeypatch):
    root = fake_trees.make_all_aria_tree(str(tmp_path / 'data'), images_per_class=5, size=SIZE)
    truncated = os.path.join(root, 'Original', 'Pre', 'WBC-Malignant-Pre-002.jpg')
    with open(truncated, 'rb') as f:
        data = f.read()
    with open(truncated, 'wb') as f:
        f.write(data[:len(data) // 2])
    empty = os.path.join(root, 'Original', 'Benign', 'WBC-Benign-004.jpg')
    open(empty, 'w').close()
    config = _config('all_aria', root, tmp_path / 'cache')
    with pytest.raises(prepared.UnreadableImagesError) as error:
        pipeline.load(config, str(tmp_path / 'work'))
    message = str(error.value)
    assert message.startswith('2 unreadable image(s)') and 'data.skip_corrupt=True' in message
    assert f'{truncated}: not a decodable image (truncated' in message and f'{empty}: empty file' in message
    _forbid_building(monkeypatch)  # The cache already holds the readable images.
    with config.unlocked():
        config.data.skip_corrupt = True
    dataset = pipeline.load(config, str(tmp_path / 'work'))
    summary = json.load(open(tmp_path / 'work' / 'splits.json'))
    assert summary['skipped'] == sorted([empty, truncated])
    assert sum(len(split) for split in dataset.splits.values()) == 18
    assert not {empty, truncated} & {path for split in dataset.splits.values() for path in split.paths}


def test_odd_image_modes_are_converted(tmp_path):
    root = fake_trees.make_image_folder_tree(str(tmp_path / 'data'), size=SIZE)
    rgb = fake_trees.generated_cells('synthetic_cnmc', 1, SIZE, 0)[0][0]
    cv2.imwrite(os.path.join(root, 'blast', 'cell_000.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(os.path.join(root, 'blast', 'cell_001.png'), rgb.astype(np.uint16) * 257)
    cv2.imwrite(os.path.join(root, 'normal', 'cell_000.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA))
    dataset = pipeline.load(_config('image_folder', root, tmp_path / 'cache', split_fractions={
        'train': 0.5, 'val': 0.25, 'test': 0.25}))
    tiles = [split.images[i] for split in dataset.splits.values() for i in range(len(split))]
    assert len(tiles) == 12 and {tile.shape for tile in tiles} == {(SIZE, SIZE, 3)}


def _all_aria_with_copies(tmp_path):
    root = fake_trees.make_all_aria_tree(str(tmp_path / 'data'), images_per_class=8, size=SIZE)
    original = os.path.join(root, 'Original', 'Benign', 'WBC-Benign-001.jpg')
    copies = [original]
    for folder in ('Early', 'Pre', 'Pro'):  # The same cell filed under every class: a labelling slip.
        copies.append(os.path.join(root, 'Original', folder, f'WBC-copy-{folder}.jpg'))
        shutil.copy(original, copies[-1])
    return root, copies


def test_all_aria_near_duplicates_are_kept_in_one_split(tmp_path):
    """No patient ids: the copies are one near-duplicate group, which the split keeps together."""
    root, copies = _all_aria_with_copies(tmp_path)
    dataset = pipeline.load(_config('all_aria', root, tmp_path / 'cache'), str(tmp_path / 'work'))
    split_of = {path: name for name, split in dataset.splits.items() for path in split.paths}
    assert len({split_of[path] for path in copies}) == 1
    summary = json.load(open(tmp_path / 'work' / 'splits.json'))
    joined = summary['near_duplicate_groups']
    assert joined['max_distance'] == 4 and joined['images_without_patient_id'] == len(split_of) == 4 * 8 + 3
    # The 4 copies are one group of 6 pairs (distance 0); the fake tree's cells are otherwise distinct.
    assert (joined['groups_joined'], joined['images_joined'], joined['pairs']) == (1, 4, 6)
    assert summary['near_duplicates'] == []  # The audit across splits finds none left.


def test_all_aria_near_duplicates_across_random_splits_are_reported(tmp_path):
    root, copies = _all_aria_with_copies(tmp_path)
    config = _config('all_aria', root, tmp_path / 'cache', split='random')
    dataset = pipeline.load(config, str(tmp_path / 'work'))
    split_of = {path: name for name, split in dataset.splits.items() for path in split.paths}
    expected = {frozenset((a, b)) for a in copies for b in copies if split_of[a] != split_of[b]}
    assert expected, 'the copies all landed in one split; pick another seed'
    summary = json.load(open(tmp_path / 'work' / 'splits.json'))
    assert 'near_duplicate_groups' not in summary  # data.split='random' splits images on purpose.
    reported = {frozenset(image['path'] for image in pair['images']) for pair in summary['near_duplicates']}
    assert reported == expected
    for pair in summary['near_duplicates']:
        assert pair['distance'] == 0 and [image['split'] for image in pair['images']] == [
            split_of[image['path']] for image in pair['images']]


def test_grain_worker_processes_read_the_cache(cnmc_tree, tmp_path):
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags, parsed by main.py's app.run.
        flags.FLAGS.mark_as_parsed()
    dataset = pipeline.load(_config('cnmc2019', cnmc_tree, tmp_path / 'cache'))
    batches = iter(pipeline.train_dataset(dataset.splits['train'], local_batch_size=4, seed=0, num_workers=1))
    batch = next(batches)
    assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8


def test_unknown_name_lists_every_available_name(tmp_path):
    with pytest.raises(ValueError, match='unknown data.name=.*synthetic_all4, synthetic_cnmc, cnmc2019, all_aria'):
        pipeline.load(_config('cnmc_2020', '', tmp_path))
