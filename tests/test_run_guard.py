import json
import os
import socket
import subprocess
import sys

import pytest

from allflax.data import sources
from allflax.training import run_guard
from configs import vgg19_mhsa

SYNTHETIC = tuple(sources.synthetic.CLASS_NAMES)
REAL = tuple(sources.REAL)
# Waits for `go`, tries the lock, prints the outcome, and holds a won lock until `done` exists.
CONTENDER = '''
import os, sys, time
from allflax.training import run_guard
workdir = sys.argv[1]
while not os.path.exists(os.path.join(workdir, 'go')):
    time.sleep(0.001)
try:
    lock = run_guard.WorkdirLock(workdir)
    lock.acquire()
except run_guard.WorkdirBusyError:
    print('busy', flush=True)
else:
    print('won', flush=True)
    while not os.path.exists(os.path.join(workdir, 'done')):
        time.sleep(0.01)
    lock.release()
'''


def _write_lock(workdir, content) -> bytes:
    path = os.path.join(workdir, run_guard.LOCK_NAME)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    with open(path, 'wb') as f:
        f.write(data)
    return data


def _holder(pid, host=None):
    return {'host': host or socket.gethostname(), 'pid': pid, 'started': '2026-01-02T03:04:05+00:00',
            'command': 'main.py --workdir=runs/x'}


def _finished_pid() -> int:
    process = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                             text=True, check=True)
    return int(process.stdout)


def _lock_of(workdir) -> dict:
    with open(os.path.join(workdir, run_guard.LOCK_NAME)) as f:
        return json.load(f)


def test_lock_is_written_and_removed(tmp_path):
    workdir = str(tmp_path / 'run')
    with run_guard.WorkdirLock(workdir) as lock:
        record = _lock_of(workdir)
        assert record['host'] == socket.gethostname() and record['pid'] == os.getpid()
        assert record['started'].endswith('+00:00') and record['command'] == ' '.join(sys.argv)
        assert sorted(os.listdir(workdir)) == ['run.lock']  # No temporary or takeover files left.
    assert os.listdir(workdir) == []
    lock.release()  # Idempotent.
    assert os.listdir(workdir) == []


def test_our_own_held_lock_refuses_a_second_acquire(tmp_path):
    with run_guard.WorkdirLock(str(tmp_path)):
        with pytest.raises(run_guard.WorkdirBusyError, match=f'process {os.getpid()} on this host'):
            run_guard.WorkdirLock(str(tmp_path)).acquire()
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()


def test_live_holder_refuses_and_leaves_the_file_unchanged(tmp_path):
    data = _write_lock(tmp_path, _holder(os.getppid()))
    with pytest.raises(run_guard.WorkdirBusyError) as error:
        run_guard.WorkdirLock(str(tmp_path)).acquire()
    message = str(error.value)
    assert str(os.getppid()) in message and '2026-01-02T03:04:05+00:00' in message
    assert 'another --workdir' in message and os.path.join(str(tmp_path), 'run.lock') in message
    assert (tmp_path / 'run.lock').read_bytes() == data
    assert os.listdir(tmp_path) == ['run.lock']


def test_lock_of_a_finished_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _finished_pid()
    _write_lock(tmp_path, _holder(dead))
    with caplog.at_level('WARNING'), run_guard.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()
        assert os.listdir(tmp_path) == ['run.lock']
    assert [r.getMessage() for r in caplog.records if 'taking it over' in r.getMessage()] == [
        f'{tmp_path / "run.lock"} names process {dead} on {socket.gethostname()}, which is no longer running: '
        'taking it over']
    assert os.listdir(tmp_path) == []


def test_lock_from_another_host_refuses(tmp_path):
    data = _write_lock(tmp_path, _holder(_finished_pid(), host='tpu-vm-7'))
    with pytest.raises(run_guard.WorkdirBusyError, match='host tpu-vm-7, which this machine cannot check'):
        run_guard.WorkdirLock(str(tmp_path)).acquire()
    assert (tmp_path / 'run.lock').read_bytes() == data


@pytest.mark.parametrize('content', [b'', b'{"host": "x", "pi'])
def test_empty_or_torn_lock_is_stale(tmp_path, caplog, content):
    _write_lock(tmp_path, content)
    with caplog.at_level('WARNING'), run_guard.WorkdirLock(str(tmp_path)):
        assert _lock_of(str(tmp_path))['pid'] == os.getpid()
    assert any('empty or unreadable' in r.getMessage() for r in caplog.records)


def test_exit_keeps_a_lock_another_process_owns(tmp_path):
    with run_guard.WorkdirLock(str(tmp_path)):
        other = _write_lock(tmp_path, _holder(os.getppid()))
    assert (tmp_path / 'run.lock').read_bytes() == other


def test_one_of_many_racing_processes_takes_a_stale_lock_over(tmp_path):
    _write_lock(tmp_path, _holder(_finished_pid()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = [subprocess.Popen([sys.executable, '-c', CONTENDER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True, cwd=root) for _ in range(8)]
    (tmp_path / 'go').touch()
    outcomes = {process.pid: process.stdout.readline().strip() for process in processes}
    winners = [pid for pid, outcome in outcomes.items() if outcome == 'won']
    assert len(winners) == 1 and sorted(outcomes.values()).count('busy') == 7
    assert _lock_of(str(tmp_path))['pid'] == winners[0]
    (tmp_path / 'done').touch()
    assert [process.wait(timeout=10) for process in processes] == [0] * 8
    assert sorted(os.listdir(tmp_path)) == ['done', 'go']


def test_pending_takeover_refuses(tmp_path):
    data = _write_lock(tmp_path, _holder(_finished_pid()))
    (tmp_path / 'run.lock.takeover').write_bytes(b'')
    with pytest.raises(run_guard.WorkdirBusyError, match='run.lock.takeover'):
        run_guard.WorkdirLock(str(tmp_path)).acquire()
    assert (tmp_path / 'run.lock').read_bytes() == data


def _configs():
    saved = json.loads(json.dumps(vgg19_mhsa.get_config('demo').to_dict()))  # As config.json holds it.
    return saved, vgg19_mhsa.get_config('demo')


def test_identical_config_resumes_silently():
    saved, new = _configs()
    assert run_guard.check_resume(saved, new.to_dict(), workdir='runs/a') == []


def test_seed_and_model_changes_are_refused_and_listed():
    saved, new = _configs()
    new.seed = 3
    new.model.name = 'vgg16'
    new.log_every_steps = 5
    with pytest.raises(run_guard.ResumeMismatchError) as error:
        run_guard.check_resume(saved, new.to_dict(), workdir='runs/a')
    assert str(error.value) == (
        "refusing to resume runs/a: its config.json differs in 2 settings that change the result:\n"
        "  model.name: 'vgg19_mhsa' -> 'vgg16'\n"
        "  seed: 0 -> 3\n"
        "Rerun with the same settings, or train into a new --workdir.")


def test_num_workers_change_is_refused():
    saved, new = _configs()
    new.data.num_workers = 2
    with pytest.raises(run_guard.ResumeMismatchError, match='data.num_workers: 0 -> 2'):
        run_guard.check_resume(saved, new.to_dict(), workdir='runs/a')


def test_logging_evaluation_and_folders_may_change():
    saved, new = _configs()
    new.log_every_steps = 5
    new.eval.tta = True
    new.data.dir = '/mnt/moved'
    assert run_guard.check_resume(saved, new.to_dict(), workdir='runs/a') == [
        "data.dir: '' -> '/mnt/moved'", 'eval.tta: False -> True', 'log_every_steps: 20 -> 5']


def test_total_steps_may_grow_but_not_shrink():
    saved, new = _configs()
    new.total_steps = 1600
    assert run_guard.check_resume(saved, new.to_dict(), workdir='runs/a') == [
        'total_steps: 800 -> 1600 (the learning-rate schedule is stretched over the new total from the '
        'resumed step on)']
    new.total_steps = 400
    with pytest.raises(run_guard.ResumeMismatchError, match='total_steps: 800 -> 400'):
        run_guard.check_resume(saved, new.to_dict(), workdir='runs/a')
    saved['total_steps'] = 0
    new.total_steps = 1600
    with pytest.raises(run_guard.ResumeMismatchError, match="total_steps: 0 -> 1600 \\(the run's length came"):
        run_guard.check_resume(saved, new.to_dict(), workdir='runs/a')


def test_tuples_equal_lists_and_floats_compare_exactly():
    assert run_guard.check_resume({'data': {'mean': [0.5, 0.25]}}, {'data': {'mean': (0.5, 0.25)}},
                                  workdir='w') == []
    with pytest.raises(run_guard.ResumeMismatchError, match=r'data.mean: \[0.5, 0.25\] -> \(0.5, 0.250001\)'):
        run_guard.check_resume({'data': {'mean': [0.5, 0.25]}}, {'data': {'mean': (0.5, 0.250001)}},
                               workdir='w')


def test_key_missing_from_an_older_run():
    saved, new = {'seed': 0}, {'seed': 0, 'data': {'skip_corrupt': False}}
    assert run_guard.check_resume(saved, new, workdir='w', defaults={'data': {'skip_corrupt': False}}) == [
        'data.skip_corrupt: absent -> False (the default; the run predates this setting)']
    new['data']['skip_corrupt'] = True
    with pytest.raises(run_guard.ResumeMismatchError, match='data.skip_corrupt: absent -> True'):
        run_guard.check_resume(saved, new, workdir='w', defaults={'data': {'skip_corrupt': False}})
    with pytest.raises(run_guard.ResumeMismatchError, match='model.name: .vgg16. -> absent'):
        run_guard.check_resume({'model': {'name': 'vgg16'}}, {}, workdir='w')


def _validate(config):
    run_guard.validate_config(config, synthetic_names=SYNTHETIC, real_names=REAL)


def test_recipe_config_is_valid():
    _validate(vgg19_mhsa.get_config('demo'))
    _validate(vgg19_mhsa.get_config())


def test_negative_total_steps_is_named():
    config = vgg19_mhsa.get_config('demo')
    config.total_steps = -5
    with pytest.raises(run_guard.ConfigError) as error:
        _validate(config)
    assert str(error.value) == ('invalid config:\n  total_steps=-5 must be >= 0 (0 trains for num_epochs); '
                                'set --config.total_steps')


def test_every_invalid_value_is_listed():
    config = vgg19_mhsa.get_config('demo')
    config.batch_size = 0
    config.keep_checkpoints = 0
    config.optimizer.learning_rate = 0.0
    config.data.split_fractions.test = 0.3
    message = pytest.raises(run_guard.ConfigError, _validate, config).value.args[0]
    assert message.count('\n  ') == 4
    for part in ('batch_size=0', 'keep_checkpoints=0', 'optimizer.learning_rate=0.0', 'data.split_fractions='):
        assert part in message


def test_data_dir_with_a_synthetic_set_is_refused():
    config = vgg19_mhsa.get_config('demo')
    config.data.dir = '/data/cnmc'
    with pytest.raises(run_guard.ConfigError, match="data.dir='/data/cnmc' is ignored by the synthetic data set "
                                                    'synthetic_all4: set --config.data.name to a real data set '
                                                    r'\(cnmc2019, all_aria, all_idb2, image_folder\)'):
        _validate(config)


def test_real_set_without_data_dir_is_refused():
    config = vgg19_mhsa.get_config('demo')
    config.data.name = 'cnmc2019'
    with pytest.raises(run_guard.ConfigError, match='set --config.data.dir'):
        _validate(config)
    config.data.dir = '/data/cnmc'
    _validate(config)
