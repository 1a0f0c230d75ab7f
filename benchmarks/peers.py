"""Our train step against the same model in peer frameworks, in one run: images/s and the
ratio ours / fastest peer, as a markdown table and a JSON file.

  python -m benchmarks.peers --models=vgg19@64,efficientnetv2_b3@128 --rounds=3

For each model@size, each framework runs in a process of its own, one after another, and with
--rounds=N the whole sequence N times, each round starting one framework later (on a shared or
virtual machine a slow minute then lands on different frameworks); each framework's entry is its
median round (of an even count, the lower middle one), so every number shown was measured.
allflax is `benchmarks.throughput --head=gap` (the train step `main.py` runs, with its one
warm-up step; --warmup applies to the peers), the peers are `benchmarks.peer_step` (Keras 3
on TensorFlow, Keras 3 on JAX, PyTorch; see its docstring for what each builds). Peer
packages: `pip install -r benchmarks/requirements.txt` (or `make peers`). A framework that is
not installed is recorded as skipped with its ImportError, a process that fails as failed
with the end of its output; neither stops the run.
"""
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import records

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['vgg19@64', 'efficientnetv2_b3@128'], 'model@image_size cases.')
flags.DEFINE_list('frameworks', ['allflax', 'allflax-bfloat16', 'keras-tensorflow', 'keras-jax', 'torch'],
                  "Frameworks to run; 'allflax-bfloat16' is ours with --dtype=bfloat16 (parameters float32), "
                  'set against the fastest peer in --dtype.')
flags.DEFINE_integer('batch_size', 16, 'Images per step.')
flags.DEFINE_integer('steps', 10, 'Timed train steps of each.')
flags.DEFINE_integer('rounds', 1, 'Times every framework runs, in rotated order; the median round counts.',
                     lower_bound=1)
flags.DEFINE_integer('warmup', 2, "Untimed steps of the peers first (ours: throughput's one).")
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], "Compute dtype of every framework but 'allflax-bfloat16'.")
flags.DEFINE_enum('keras_jit_compile', 'auto', ['auto', 'true', 'false'], 'Passed to peer_step.')
flags.DEFINE_boolean('torch_compile', False, 'Passed to peer_step.')
flags.DEFINE_integer('timeout', 3600, 'Seconds one framework process may run.')
flags.DEFINE_string('json_path', 'benchmarks/peers.json', 'Where the results go.')
flags.DEFINE_string('markdown_path', 'benchmarks/peers.md', 'Where the table goes.')

OURS, OURS_BFLOAT16 = 'allflax', 'allflax-bfloat16'
NAMES = {OURS: 'allflax (ours)', OURS_BFLOAT16: 'ours, bfloat16', 'keras-tensorflow': 'Keras 3 / TensorFlow', 'keras-jax': 'Keras 3 / JAX',
         'torch': 'PyTorch'}
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'keras', 'tensorflow', 'tensorflow-cpu', 'torch', 'torchvision',
            'timm', 'numpy')


def command(framework: str, model: str, image_size: int) -> list[str]:
    dtype = 'bfloat16' if framework == OURS_BFLOAT16 else FLAGS.dtype
    shape = [f'--model={model}', f'--image_size={image_size}', f'--batch_size={FLAGS.batch_size}',
             f'--dtype={dtype}', f'--steps={FLAGS.steps}']
    if framework in (OURS, OURS_BFLOAT16):
        return [sys.executable, '-m', 'benchmarks.throughput', '--head=gap', *shape]
    return [sys.executable, '-m', 'benchmarks.peer_step', f'--framework={framework}', *shape,
            f'--warmup={FLAGS.warmup}', f'--keras_jit_compile={FLAGS.keras_jit_compile}',
            f'--torch_compile={FLAGS.torch_compile}']


def run_one(framework: str, model: str, image_size: int) -> dict:
    """The JSON line one framework's process prints, with a status: ok, skipped or failed."""
    record = {'framework': framework, 'model': model, 'image_size': image_size}
    env = dict(os.environ)
    if framework.startswith('keras-'):
        env['KERAS_BACKEND'] = framework.removeprefix('keras-')  # Fixed when keras is first imported.
    start = time.perf_counter()
    try:
        done = subprocess.run(command(framework, model, image_size), env=env, capture_output=True, text=True,
                              timeout=FLAGS.timeout)
    except subprocess.TimeoutExpired:
        return {**record, 'status': 'failed', 'error': f'timed out after {FLAGS.timeout} s'}
    record['wall_seconds'] = round(time.perf_counter() - start, 1)
    # Libraries write to stdout too; the result is the last line that is a JSON object.
    lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
    if done.returncode or not lines:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        return {**record, 'status': 'failed', 'error': f'exit {done.returncode}: ' + '\n'.join(tail)}
    result = json.loads(lines[-1])
    return {**record, 'status': 'skipped' if 'skipped' in result else 'ok', 'result': result}


def combine(rounds: list[dict]) -> dict:
    """One framework's record from its rounds (run_one's records, same framework and case): the ok
    round of median train images/s (the lower middle one of an even count), with every round's
    images/s and how many failed; the first round if none is ok (skipped, or failed)."""
    ok = [r for r in rounds if r['status'] == 'ok']  # In the order they ran.
    if not ok:
        return rounds[0]
    median = sorted(ok, key=images_per_sec)[(len(ok) - 1) // 2]
    return {**median, 'rounds_images_per_sec': [images_per_sec(r) for r in ok], 'failed_rounds': len(rounds) - len(ok)}


def parse_models(cases: list[str]) -> list[tuple[str, int]]:
    parsed = []
    for case in cases:
        model, _, size = case.partition('@')
        if not size.isdigit():
            raise app.UsageError(f'--models takes model@image_size, got {case!r}')
        parsed.append((model, int(size)))
    return parsed


def environment() -> dict:
    """What the numbers depend on: the CPU, how busy it was, and the versions of everything."""
    cpu_model = 'unknown'
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu_model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                             cpu_model)
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {'cpu_model': cpu_model, 'cpus': os.cpu_count(), 'python': platform.python_version(),
            'platform': platform.platform(), 'commit': commit, 'versions': records.installed_versions(PACKAGES),
            'load_average_1min_start': round(os.getloadavg()[0], 1),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %z')}


def images_per_sec(record: dict) -> float | None:
    return record['result']['train_images_per_sec'] if record['status'] == 'ok' else None


def ratios(records: list[dict]) -> list[dict]:
    """Per model@size: ours / each peer that ran, ours / the fastest of them, and ours in
    bfloat16 / that fastest peer."""
    out = []
    for case in dict.fromkeys((r['model'], r['image_size']) for r in records):
        ran = {r['framework']: images_per_sec(r) for r in records
               if (r['model'], r['image_size']) == case and images_per_sec(r)}
        ours, ours_bfloat16 = ran.pop(OURS, None), ran.pop(OURS_BFLOAT16, None)
        row = {'model': case[0], 'image_size': case[1], 'ours_images_per_sec': ours,
               'ours_over': {peer: round(ours / value, 3) for peer, value in ran.items()} if ours else {}}
        if ran:
            fastest = max(ran, key=ran.get)
            row.update(fastest_peer=fastest, fastest_peer_images_per_sec=ran[fastest],
                       ours_over_fastest_peer=round(ours / ran[fastest], 3) if ours else None)
            if ours_bfloat16:
                row.update(ours_bfloat16_images_per_sec=ours_bfloat16,
                           ours_bfloat16_over_fastest_peer=round(ours_bfloat16 / ran[fastest], 3))
        out.append(row)
    return out


def cell(record: dict | None) -> str:
    if record is None:
        return '–'
    if record['status'] == 'skipped':  # peer_step skips only on an ImportError.
        return 'not installed'
    if record['status'] == 'failed':
        return 'failed'
    return f"{record['result']['train_images_per_sec']:.1f}"


def markdown(report: dict) -> str:
    """The images/s table, a line on the setting and one on the environment."""
    records, setting, env = report['results'], report['setting'], report['environment']
    frameworks = list(dict.fromkeys(r['framework'] for r in records))
    bfloat16 = OURS_BFLOAT16 in frameworks
    lines = ['| model @ px | ' + ' | '.join(NAMES.get(f, f) for f in frameworks) + ' | ours / fastest peer |'
             + (' ours bfloat16 / fastest peer |' if bfloat16 else ''),
             '|---' * (len(frameworks) + 2 + bfloat16) + '|']
    for row in report['ratios']:
        case = (row['model'], row['image_size'])
        by_framework = {r['framework']: r for r in records if (r['model'], r['image_size']) == case}
        ratio = row.get('ours_over_fastest_peer')
        ratio = f"{ratio:.2f} ({NAMES.get(row['fastest_peer'], row['fastest_peer'])})" if ratio else '–'
        bfloat16_ratio = row.get('ours_bfloat16_over_fastest_peer')
        lines.append(f'| {case[0]} @ {case[1]} | ' + ' | '.join(cell(by_framework.get(f)) for f in frameworks)
                     + f' | {ratio} |' + (f" {f'{bfloat16_ratio:.2f}' if bfloat16_ratio else '–'} |" if bfloat16 else ''))
    versions = ', '.join(f'{name} {version}' for name, version in env['versions'].items())
    rounds = setting.get('rounds', 1)
    lines += ['', f"Train images/s (median step), batch {setting['batch_size']}, {setting['dtype']}, "
                  f"GAP → dense head, {setting['steps']} timed steps"
                  + (f", median of {rounds} rounds; `python -m benchmarks.peers --rounds={rounds}`." if rounds > 1
                     else "; `python -m benchmarks.peers`."),
              f"{env['cpu_model']}, {env['cpus']} CPUs, load average {env['load_average_1min_start']} at start, "
              f"{env.get('load_average_1min_end', '?')} at end; Python {env['python']}; {versions}."]
    return '\n'.join(lines) + '\n'


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    unknown = set(FLAGS.frameworks) - set(NAMES)
    if unknown:
        raise app.UsageError(f'unknown frameworks {sorted(unknown)}; known: {", ".join(NAMES)}')
    cases = parse_models(FLAGS.models)
    env = environment()
    rounds = {(framework, case): [] for case in cases for framework in FLAGS.frameworks}
    for turn in range(FLAGS.rounds):
        for model, image_size in cases:
            shift = turn % len(FLAGS.frameworks)
            for framework in FLAGS.frameworks[shift:] + FLAGS.frameworks[:shift]:
                if turn and rounds[framework, (model, image_size)][0]['status'] == 'skipped':
                    continue  # Not installed: no need to find out again.
                record = run_one(framework, model, image_size)
                rounds[framework, (model, image_size)].append(record)
                print(f'round {turn + 1} {model}@{image_size} {framework}: {cell(record)}', file=sys.stderr,
                      flush=True)
                if record['status'] == 'failed':
                    print(record['error'], file=sys.stderr)
    records = [combine(rounds[framework, case]) for case in cases for framework in FLAGS.frameworks]
    env['load_average_1min_end'] = round(os.getloadavg()[0], 1)
    report = {'setting': {'batch_size': FLAGS.batch_size, 'dtype': FLAGS.dtype, 'steps': FLAGS.steps,
                          'rounds': FLAGS.rounds,
                          'warmup': FLAGS.warmup, 'num_classes': 4, 'head': 'gap',
                          'keras_jit_compile': FLAGS.keras_jit_compile, 'torch_compile': FLAGS.torch_compile},
              'environment': env, 'results': records, 'ratios': ratios(records)}
    table = markdown(report)
    with open(FLAGS.json_path, 'w') as f:
        json.dump(report, f, indent=1)
    with open(FLAGS.markdown_path, 'w') as f:
        f.write(table)
    print(table)


if __name__ == '__main__':
    app.run(main)
