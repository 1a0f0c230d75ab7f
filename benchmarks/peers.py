"""Our train step against the same model in peer frameworks, in one run: images/s and the
ratio ours / fastest peer, as a markdown table and a JSON file.

  python -m benchmarks.peers --models=vgg19@64,efficientnetv2_b3@128 --rounds=6 --steps=5

For each model@size, each framework runs in a process of its own, all kept alive and
interleaved: each is started in turn (its set-up and compilation alone on the machine), then they
take turns at blocks of --steps timed train steps, --rounds blocks each, the order rotated by one
framework every round, with a pause between blocks. On a shared or virtual machine whose speed
drifts over minutes (by a third on the 2-core VMs of RESULTS.md), every framework so samples the
same slow and fast minutes; each one's images/s is the median of all its timed steps.
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
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from benchmarks import records

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['vgg19@64', 'efficientnetv2_b3@128'], 'model@image_size cases.')
flags.DEFINE_list('frameworks', ['allflax', 'allflax-bfloat16', 'keras-tensorflow', 'keras-jax', 'torch'],
                  "Frameworks to run; 'allflax-bfloat16' is ours with --dtype=bfloat16 (parameters float32), "
                  'set against the fastest peer in --dtype.')
flags.DEFINE_integer('batch_size', 16, 'Images per step.')
flags.DEFINE_integer('steps', 5, 'Timed train steps in each block.', lower_bound=1)
flags.DEFINE_integer('rounds', 6, 'Blocks of --steps each framework times, interleaved with the others.',
                     lower_bound=1)
flags.DEFINE_integer('warmup', 2, "Untimed steps of the peers first (ours: throughput's one).")
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], "Compute dtype of every framework but 'allflax-bfloat16'.")
flags.DEFINE_enum('keras_jit_compile', 'auto', ['auto', 'true', 'false'], 'Passed to peer_step.')
flags.DEFINE_boolean('torch_compile', False, 'Passed to peer_step.')
flags.DEFINE_integer('timeout', 3600, 'Seconds one framework process may run, from its start to its end.')
flags.DEFINE_string('json_path', 'benchmarks/peers.json', 'Where the results go.')
flags.DEFINE_string('markdown_path', 'benchmarks/peers.md', 'Where the table goes.')

OURS, OURS_BFLOAT16 = 'allflax', 'allflax-bfloat16'
NAMES = {OURS: 'allflax (ours)', OURS_BFLOAT16: 'ours, bfloat16', 'keras-tensorflow': 'Keras 3 / TensorFlow', 'keras-jax': 'Keras 3 / JAX',
         'torch': 'PyTorch'}
# Between blocks, so that the threads of the worker just timed stop spinning before the next is timed.
PAUSE_SECONDS = 1.0
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'keras', 'tensorflow', 'tensorflow-cpu', 'torch', 'torchvision',
            'timm', 'numpy')


def command(framework: str, model: str, image_size: int) -> list[str]:
    dtype = 'bfloat16' if framework == OURS_BFLOAT16 else FLAGS.dtype
    shape = [f'--model={model}', f'--image_size={image_size}', f'--batch_size={FLAGS.batch_size}',
             f'--dtype={dtype}', f'--steps={FLAGS.steps}', '--blocks_from_stdin']
    if framework in (OURS, OURS_BFLOAT16):
        return [sys.executable, '-m', 'benchmarks.throughput', '--head=gap', *shape]
    return [sys.executable, '-m', 'benchmarks.peer_step', f'--framework={framework}', *shape,
            f'--warmup={FLAGS.warmup}', f'--keras_jit_compile={FLAGS.keras_jit_compile}',
            f'--torch_compile={FLAGS.torch_compile}']


class Worker:
    """One framework's process, kept alive over the run: each `block()` has it time a block of
    train steps (a line on its stdin; it answers with the block's step seconds), `finish()`
    closes its stdin and returns its record: the JSON line it ends with and a status, ok,
    skipped (a peer not installed) or failed (with the end of its output)."""

    def __init__(self, argv: list[str], timeout: float, env: dict | None = None):
        self.timeout, self.start = timeout, time.perf_counter()
        self.blocks_images_per_sec, self.final, self.error = [], None, None
        self.stderr = tempfile.TemporaryFile(mode='w+')  # A file: a chatty library never fills a pipe and stalls.
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=env)
        # Its stdout lines, read by a thread so that waiting for one can time out; None at the end.
        self.lines, self.output = queue.Queue(), []
        self.reader = threading.Thread(target=self._read_stdout, daemon=True)
        self.reader.start()

    def _read_stdout(self):
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    @property
    def running(self) -> bool:
        return self.final is None and self.error is None

    def block(self, batch_size: int) -> float | None:
        """Images/s of one block (its median step); None once the worker has ended or failed."""
        if not self.running:
            return None
        try:
            self.process.stdin.write('run\n')
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # It has ended; its output says how.
        line = self._json_line()
        if line is None or 'block_step_seconds' not in line:
            self.final = line
            if line is None and self.error is None:
                self.error = f'exit {self.process.wait()}: {self._output_tail()}'
            return None
        images_per_sec = round(batch_size / statistics.median(line['block_step_seconds']), 2)
        self.blocks_images_per_sec.append(images_per_sec)
        return images_per_sec

    def finish(self) -> dict:
        if self.running:
            self.process.stdin.close()
            self.final = self._json_line()
        returncode = self.process.wait()
        record = {'wall_seconds': round(time.perf_counter() - self.start, 1)}
        if self.error is None and (returncode or self.final is None):
            self.error = f'exit {returncode}: {self._output_tail()}'
        self.stderr.close()
        if self.error is not None:
            return {**record, 'status': 'failed', 'error': self.error}
        status = 'skipped' if 'skipped' in self.final else 'ok'
        return {**record, 'status': status, 'result': self.final,
                **({'blocks_images_per_sec': self.blocks_images_per_sec} if status == 'ok' else {})}

    def _json_line(self) -> dict | None:
        """The next line of stdout that is a JSON object (libraries print to stdout too); None at
        its end, or after the timeout (the process is then killed)."""
        deadline = self.start + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                self.process.kill()
                self.error = f'timed out after {self.timeout} s'
                return None
            if line is None:
                return None
            if line.startswith('{'):
                return json.loads(line)

    def _output_tail(self) -> str:
        """The last lines of its stdout and stderr, once it has exited."""
        self.reader.join(timeout=5)  # Its last lines may still be on their way through the reader.
        self.stderr.seek(0)
        return '\n'.join((''.join(self.output) + self.stderr.read()).strip().splitlines()[-15:])


def run_case(model: str, image_size: int) -> list[dict]:
    """Every framework on one model@size, interleaved: each framework's process is started in turn
    (set-up and compilation alone on the machine), then they take turns at blocks of --steps
    steps, --rounds blocks each, the order rotated one framework per round; each record's
    images/s is the median of all its timed steps."""
    frameworks, workers = FLAGS.frameworks, {}
    for turn in range(FLAGS.rounds):
        shift = turn % len(frameworks)
        for framework in frameworks[shift:] + frameworks[:shift]:
            if framework not in workers:
                env = dict(os.environ)
                if framework.startswith('keras-'):
                    env['KERAS_BACKEND'] = framework.removeprefix('keras-')  # Fixed when keras is first imported.
                workers[framework] = Worker(command(framework, model, image_size), FLAGS.timeout, env)
            images_per_sec = workers[framework].block(FLAGS.batch_size)
            if images_per_sec is not None:
                print(f'{model}@{image_size} block {turn + 1} {framework}: {images_per_sec:.1f} images/s',
                      file=sys.stderr, flush=True)
                time.sleep(PAUSE_SECONDS)
    records = []
    for framework in frameworks:
        record = {'framework': framework, 'model': model, 'image_size': image_size, **workers[framework].finish()}
        print(f'{model}@{image_size} {framework}: {cell(record)}', file=sys.stderr, flush=True)
        if record['status'] == 'failed':
            print(record['error'], file=sys.stderr)
        records.append(record)
    return records


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
    rounds, steps = setting['rounds'], setting['steps']
    lines += ['', f"Train images/s (median step), batch {setting['batch_size']}, {setting['dtype']}, "
                  f"GAP → dense head; the frameworks interleaved, {rounds} blocks of {steps} timed steps each; "
                  f"`python -m benchmarks.peers --rounds={rounds} --steps={steps}`.",
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
    records = [record for model, image_size in cases for record in run_case(model, image_size)]
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
