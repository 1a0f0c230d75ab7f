"""No mode replaces or removes what allflax did not write: each output path that holds a user's
file or folder is refused in one line, before anything is read or written."""
import csv
import json
import os

import pytest

from allflax import files
from allflax.data import image_files
from allflax.modes import compare, montecarlo, predict
from allflax.training import loop, resume_check, workdir_lock


def tree(folder):
    """Every file below `folder` with its bytes, and every folder."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            found[os.path.join(root, name)] = None
        for name in names:
            path = os.path.join(root, name)
            found[path] = os.readlink(path) if os.path.islink(path) else open(path, 'rb').read()
    return found


def write_csv(path, header, rows=()):
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([header, *rows])


def test_predictions_replace_only_allflax_csvs(tmp_path):
    own = str(tmp_path / 'preds.csv')
    write_csv(own, ['path', 'predicted_class', 'all', 'hem'], [['a.png', 'all', '0.9', '0.1']])
    write_csv(str(tmp_path / 'preds.errors.csv'), ['path', 'reason'])
    image_files.check_outputs(own)  # Its own files: replaced.

    patients = str(tmp_path / 'patients.csv')
    write_csv(patients, ['patient', 'age'], [['P001', '7']])
    write_csv(str(tmp_path / 'mine.errors.csv'), ['error', 'count'])
    (tmp_path / 'folder.csv').mkdir()
    os.symlink(own, str(tmp_path / 'link.csv'))
    before = tree(tmp_path)
    for output, message in [
            (patients, f'{patients} exists and is not a predictions CSV that allflax wrote'),
            (str(tmp_path / 'mine.csv'), f'{tmp_path}/mine.errors.csv exists and is not a predict errors CSV'),
            (str(tmp_path / 'folder.csv'), 'exists and is not a file'),
            (str(tmp_path / 'link.csv'), 'is a symbolic link')]:
        with pytest.raises(files.OutputRefused, match=message):
            image_files.check_outputs(output)
        # --mode=predict refuses before it reads the run (there is none here) or any image.
        with pytest.raises(files.OutputRefused, match=message):
            predict.predict(None, str(tmp_path / 'no_run'), str(tmp_path / 'no_images'), output)
    assert tree(tmp_path) == before


def test_predict_gradcam_refuses_a_folder_of_other_files(tmp_path):
    gradcam = tmp_path / 'preds_gradcam'
    gradcam.mkdir()
    (gradcam / '0000_cell_pred-all.png').write_bytes(b'panel')
    (gradcam / '.ipynb_checkpoints').mkdir()  # Hidden: passed over.
    output = str(tmp_path / 'preds.csv')
    with pytest.raises(FileNotFoundError):  # Its own panels: it goes on, to the (missing) run.
        predict.predict(None, str(tmp_path / 'no_run'), str(tmp_path), output, gradcam=True)
    (gradcam / 'slide.svs').write_bytes(b'scan')
    before = tree(tmp_path)
    with pytest.raises(files.OutputRefused, match=rf'{gradcam} holds files that allflax did not write there '
                                                  r'\(slide.svs\)'):
        predict.predict(None, str(tmp_path / 'no_run'), str(tmp_path), output, gradcam=True)
    assert tree(tmp_path) == before


def test_compare_refuses_files_it_did_not_write(tmp_path):
    output_dir = tmp_path / 'report'
    output_dir.mkdir()
    (output_dir / 'compare.json').write_text(json.dumps({'a': 'x', 'b': 'y'}))  # Not a comparison's keys.
    (output_dir / 'compare.html').write_text('<html><title>Comparison of two runs</title></html>')
    before = tree(tmp_path)
    with pytest.raises(files.OutputRefused, match=f'{output_dir}/compare.json exists and is not a compare.json'):
        compare.compare([str(tmp_path / 'a'), str(tmp_path / 'b')], 'test', str(output_dir))
    (output_dir / 'compare.json').write_text(json.dumps(
        {'a': 'x', 'b': 'y', 'mcnemar': {}, 'difference_a_minus_b': {}}))
    before = tree(tmp_path)
    # A page with the title but not written by allflax's html.write_page.
    with pytest.raises(files.OutputRefused, match=f'{output_dir}/compare.html exists and is not a compare.html'):
        compare.compare([str(tmp_path / 'a'), str(tmp_path / 'b')], 'test', str(output_dir))
    assert tree(tmp_path) == before


def test_training_refuses_a_folder_that_is_not_a_run(tiny_config, tmp_path):
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('my notes')
    (mine / 'config.json').write_text(json.dumps({'project': 'not allflax'}))
    before = tree(tmp_path)
    with pytest.raises(files.OutputRefused, match=f'{mine}/config.json is not an allflax run\'s config.json'):
        loop.train_and_evaluate(tiny_config, str(mine))
    os.remove(mine / 'config.json')
    before = tree(tmp_path)
    with pytest.raises(files.OutputRefused, match=rf'{mine} holds files that allflax did not write there '
                                                  r'\(notes.txt\)'):
        loop.train_and_evaluate(tiny_config, str(mine))
    assert tree(tmp_path) == before

    # What a run writes, a run that stopped before its config.json included, is a run's.
    started = tmp_path / 'started'
    (started / 'checkpoints').mkdir(parents=True)
    (started / workdir_lock.LOCK_NAME).write_text('')
    (started / '.config.json.x.tmp').write_text('')
    assert resume_check.saved_run_config(str(started)) is None
    with open(started / 'config.json', 'w') as f:
        f.write(tiny_config.to_json_best_effort())
    (started / 'notes.txt').write_text('added later by the user')  # Kept, and the run is still a run.
    assert resume_check.saved_run_config(str(started))['seed'] == tiny_config.seed


def test_montecarlo_refuses_a_folder_of_other_files(tiny_config, tmp_path):
    workdir = tmp_path / 'mc_run'
    (workdir / 'mc' / 'drafts').mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(files.OutputRefused, match=rf'{workdir}/mc holds files that allflax did not write there '
                                                  r'\(drafts\)'):
        montecarlo.run(tiny_config, str(workdir))
    (workdir / 'mc' / 'drafts').rmdir()
    (workdir / 'paper.tex').write_text('')
    with pytest.raises(files.OutputRefused, match=r'holds files that allflax did not write there \(paper.tex\)'):
        montecarlo.run(tiny_config, str(workdir))
