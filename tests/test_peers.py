"""The peer benchmark's ratios and table, on made-up results (no framework is run)."""
from benchmarks import peers


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
            'setting': {'batch_size': 16, 'dtype': 'float32', 'steps': 10},
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


def test_combine_keeps_the_median_round():
    rounds = [record('torch', 'b3', 30.0), record('torch', 'b3', status='failed'), record('torch', 'b3', 22.0),
              record('torch', 'b3', 26.0)]
    combined = peers.combine(rounds)
    assert combined['result']['train_images_per_sec'] == 26.0
    assert combined['rounds_images_per_sec'] == [30.0, 22.0, 26.0] and combined['failed_rounds'] == 1
    # Of an even count the lower middle round, so the number shown is one that was measured.
    assert peers.combine(rounds[2:] + rounds[:1])['result']['train_images_per_sec'] == 26.0
    assert peers.combine([record('torch', 'b3', 30.0), record('torch', 'b3', 22.0)])['result'][
        'train_images_per_sec'] == 22.0


def test_combine_without_an_ok_round_keeps_the_first():
    rounds = [record('torch', 'b3', status='skipped')]
    assert peers.combine(rounds) is rounds[0]
    failed = [record('torch', 'b3', status='failed'), record('torch', 'b3', status='failed')]
    assert peers.combine(failed) is failed[0]


def test_markdown_names_the_rounds():
    rounds_report = report()
    rounds_report['setting']['rounds'] = 3
    assert 'median of 3 rounds; `python -m benchmarks.peers --rounds=3`.' in peers.markdown(rounds_report)
    assert '10 timed steps; `python -m benchmarks.peers`.' in peers.markdown(report())
