"""The peer benchmark's ratios and table on made-up results, and its interleaving of worker
processes on fake workers that speak the real protocol (no framework is run)."""
import io
import json
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from benchmarks import peers, records


def record(framework, model, images_per_sec=None, status='ok'):
    result = {'train_images_per_sec': images_per_sec} if status == 'ok' else {}
    if status == 'skipped':
        result = {'skipped': "ModuleNotFoundError: No module named 'torch'"}
    out = {'framework': framework, 'model': model, 'image_size': 64, 'status': status, 'result': result}
    if status == 'failed':
        del out['result']
        out['error'] = 'exit 1: boom'
    return out


RECORDS = [record('allflax', 'vgg19', 27.0), record('keras-tensorflow', 'vgg19', 39.3),
           record('keras-jax', 'vgg19', 30.0), record('torch', 'vgg19', status='skipped'),
           record('allflax', 'b3', status='failed'), record('keras-tensorflow', 'b3', 38.9),
           record('keras-jax', 'b3', status='failed'), record('torch', 'b3', 53.9)]


def report():
    return {'results': RECORDS, 'ratios': peers.ratios(RECORDS),
            'setting': {'batch_size': 16, 'dtype': 'float32', 'steps': 10, 'rounds': 6},
            'environment': {'cpu_model': 'AMD EPYC', 'cpus': 2, 'python': '3.11.7', 'versions': {'keras': '3.15.1'},
                            'load_average_1min_start': 0.1, 'load_average_1min_end': 0.2}}


def test_ratios_to_fastest_peer_that_ran():
    vgg, b3 = peers.ratios(RECORDS)
    assert vgg['fastest_peer'] == 'keras-tensorflow'
    assert vgg['ours_over_fastest_peer'] == round(27.0 / 39.3, 3)
    assert vgg['ours_over'] == {'keras-tensorflow': round(27.0 / 39.3, 3), 'keras-jax': 0.9}
    assert b3['fastest_peer'] == 'torch' and b3['ours_over_fastest_peer'] is None


def test_markdown_table():
    lines = peers.markdown(report()).splitlines()
    assert lines[0] == ('| model @ px | allflax (ours) | Keras 3 / TensorFlow | Keras 3 / JAX | PyTorch '
                        '| ours / fastest peer |')
    assert lines[2] == '| vgg19 @ 64 | 27.0 | 39.3 | 30.0 | not installed | 0.69 (Keras 3 / TensorFlow) |'
    assert lines[3] == '| b3 @ 64 | failed | 38.9 | failed | 53.9 | – |'
    assert 'AMD EPYC, 2 CPUs' in lines[-1]


def test_parse_models():
    assert peers.parse_models(['vgg19@64', 'efficientnetv2_b3@128']) == [('vgg19', 64), ('efficientnetv2_b3', 128)]


def test_markdown_names_the_blocks():
    assert ('interleaved, 6 blocks of 10 timed steps each; `python -m benchmarks.peers --rounds=6 --steps=10`.'
            in peers.markdown(report()))


def test_timed_steps_in_blocks_from_stdin(monkeypatch, capsys):
    seconds = iter([0.5, 0.25, 1.0, 0.75])
    monkeypatch.setattr(sys, 'stdin', io.StringIO('run\nrun\n'))
    times = records.timed_steps(lambda count: [next(seconds) for _ in range(count)], 2, blocks_from_stdin=True)
    assert times == [0.5, 0.25, 1.0, 0.75]
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {'block_step_seconds': [0.5, 0.25]}, {'block_step_seconds': [1.0, 0.75]}]
    assert records.timed_steps(lambda count: [0.1] * count, 3, blocks_from_stdin=False) == [0.1] * 3
    monkeypatch.setattr(sys, 'stdin', io.StringIO(''))
    with pytest.raises(ValueError, match='before the first block'):
        records.timed_steps(lambda count: [0.1] * count, 2, blocks_from_stdin=True)


# A worker as benchmarks.throughput and peer_step are one: library chatter on stdout, blocks
# timed through records.timed_steps, then one JSON record. argv: log file, name, exit code.
FAKE_WORKER = """
import json, sys
from benchmarks import records
log, name, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
print('library chatter on stdout')
seconds = iter([0.5, 0.25, 1.0, 0.5, 0.2, 0.2])
def time_steps(count):
    open(log, 'a').write(name + ' ')
    if code and open(log).read().count(name) > 1:
        print('boom', file=sys.stderr)
        sys.exit(code)
    return [next(seconds) for _ in range(count)]
train = records.timed_steps(time_steps, 2, True)
print(json.dumps({'train_images_per_sec': round(16 / sorted(train)[len(train) // 2], 2), 'steps': len(train)}))
"""


def fake_worker(tmp_path, name, code=0):
    return [sys.executable, '-c', FAKE_WORKER, str(tmp_path / 'log'), name, str(code)]


def test_worker_times_blocks_until_finished(tmp_path):
    worker = peers.Worker(fake_worker(tmp_path, 'torch'), timeout=60)
    assert worker.block(batch_size=16) == round(16 / 0.375, 2)
    assert worker.block(batch_size=16) == round(16 / 0.75, 2)
    record = worker.finish()
    assert record['status'] == 'ok' and record['blocks_images_per_sec'] == [42.67, 21.33]
    assert record['result'] == {'train_images_per_sec': 32.0, 'steps': 4}


def test_worker_failing_midway_is_failed_with_its_output(tmp_path):
    worker = peers.Worker(fake_worker(tmp_path, 'torch', code=3), timeout=60)
    assert worker.block(batch_size=16) == 42.67
    assert worker.block(batch_size=16) is None and worker.block(batch_size=16) is None
    record = worker.finish()
    assert record['status'] == 'failed' and record['error'].startswith('exit 3:') and 'boom' in record['error']


def test_worker_skipped_or_timed_out(tmp_path):
    skipped = peers.Worker([sys.executable, '-c', 'print(\'{"skipped": "ImportError: torch"}\')'], 60)
    assert skipped.block(batch_size=16) is None
    assert skipped.finish() == {'wall_seconds': pytest.approx(0, abs=60), 'status': 'skipped',
                                'result': {'skipped': 'ImportError: torch'}}
    stuck = peers.Worker([sys.executable, '-c', 'import time; time.sleep(60)'], timeout=1)
    assert stuck.block(batch_size=16) is None
    assert stuck.finish()['error'] == 'timed out after 1 s'


def test_run_case_interleaves_the_frameworks_in_rotated_order(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, 'command', lambda framework, model, size: fake_worker(tmp_path, framework))
    monkeypatch.setattr(peers, 'PAUSE_SECONDS', 0)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(frameworks=['allflax', 'torch', 'keras-jax'], rounds=3, steps=2, batch_size=16):
        results = peers.run_case('vgg19', 64)
    assert (tmp_path / 'log').read_text().split() == ['allflax', 'torch', 'keras-jax', 'torch', 'keras-jax',
                                                      'allflax', 'keras-jax', 'allflax', 'torch']
    assert [r['framework'] for r in results] == ['allflax', 'torch', 'keras-jax']
    assert all(r['status'] == 'ok' and r['result']['steps'] == 6 and r['model'] == 'vgg19' for r in results)
