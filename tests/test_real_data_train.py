"""Training end to end on real on-disk layouts (tiny fake trees): listing, tile cache, patient
split, Grain (with worker processes too), paper 2's augmentation in the step, checkpoint, test."""
import csv
import json
import os

from absl import flags

from allflax.data.sources import fake_trees
from allflax.modes import evaluate
from allflax.training import checkpoints, loop
from configs import efficientnetv2_b3_se, vgg19_mhsa

SIZE = 32


def _config(name, data_dir, cache_dir, **data):
    """VGG19+MHSA (quick to build on CPU) on 32-px tiles for 3 steps."""
    config = vgg19_mhsa.get_config()
    with config.unlocked():
        config.data.update(name=name, dir=data_dir, cache_dir=str(cache_dir), image_size=SIZE, **data)
        config.batch_size = 8
        config.total_steps = 3
        config.log_every_steps = 1
        config.eval_every_steps = 3
        config.checkpoint_every_steps = 3
    return config


def _check_run(workdir, result):
    with open(os.path.join(workdir, 'splits.json')) as f:
        splits = json.load(f)
    with open(os.path.join(workdir, 'eval', 'test', 'metrics.json')) as f:
        assert json.load(f)['accuracy'] == result['accuracy']
    assert result['num_examples'] == splits['test']['num_examples'] > 0
    assert checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True).latest_step() == 3


def test_cnmc2019_trains_with_paper_2s_augmentation(tmp_path):
    tree = fake_trees.make_cnmc_tree(str(tmp_path / 'tree'), size=48)
    config = _config('cnmc2019', tree, tmp_path / 'cache',
                     augment=efficientnetv2_b3_se.get_config().data.augment)
    workdir = str(tmp_path / 'run')
    result = loop.train_and_evaluate(config, workdir)
    _check_run(workdir, result)
    # A patient added to data.dir after training: --mode=eval scores the run's recorded test members,
    # the very images training's own test evaluation scored.
    cell = fake_trees.generated_cells('synthetic_cnmc', 1, 48, 7)[1][0]
    fake_trees.write_image(os.path.join(tree, 'training_data', 'fold_0', 'all', 'UID_77_1_1_all.bmp'), cell)
    values = evaluate.evaluate(config, workdir, with_report=False)
    with open(os.path.join(workdir, 'splits.json')) as f:
        members = json.load(f)['members']['splits']['test']
    with open(os.path.join(workdir, 'eval', 'test', 'predictions.csv'), newline='') as f:
        assert [row['image_id'] for row in csv.DictReader(f)] == [os.path.join(tree, m['path']) for m in members]
    assert values['accuracy'] == result['accuracy'] and values['num_examples'] == result['num_examples']


def test_all_aria_trains_from_grain_worker_processes(tmp_path):
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags, parsed by main.py's app.run.
        flags.FLAGS.mark_as_parsed()
    tree = fake_trees.make_all_aria_tree(str(tmp_path / 'tree'), images_per_class=8, size=48)
    config = _config('all_aria', tree, tmp_path / 'cache', num_workers=2)
    workdir = str(tmp_path / 'run')
    _check_run(workdir, loop.train_and_evaluate(config, workdir))
