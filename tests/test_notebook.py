"""notebooks/colab_tpu.ipynb as a Colab runtime runs it, rehearsed on the CPU: executed in SMOKE mode
by a Jupyter kernel on this interpreter, with its parameters injected as papermill does, its Drive
folder on a FUSE mount without hard links, Colab's TPU variables set, a training run killed midway
and the notebook run again from the top by a new runtime (another hostname, local disk wiped)."""
import ast
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import colab
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')
CELL_TIMEOUT_S = 600
# The rehearsal trains paper 1 alone (RECIPES): both recipes go through the same helpers, and
# paper 2's training, evaluation and report run in test_export's and test_evaluation's runs.
RUNS = ('vgg19_mhsa',)
VARIANT = 'vgg19_mhsa_dropout0.3'
KILL_AT_STEP = 12  # The smoke runs' first checkpoint, of 24 steps.


def _jupyter():
    """nbclient and nbformat, failing (never skipping) where the test requirements are missing."""
    try:
        import ipykernel  # noqa: F401  (the kernel the notebook runs in)
        import nbclient
        import nbformat
    except ImportError as error:
        pytest.fail(f'{error.name} is not installed: run `make test` (it installs the test requirements, '
                    f'requirements-test.txt)')
    return nbclient, nbformat


def _read_notebook(**parameters):
    """The notebook with `parameters` appended to the cell tagged `parameters`, as papermill would."""
    _, nbformat = _jupyter()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if parameters:
        cells = [cell for cell in notebook.cells if 'parameters' in cell.metadata.get('tags', [])]
        assert len(cells) == 1, f'{len(cells)} cells tagged parameters'
        cells[0].source += '\n\n# Injected by tests/test_notebook.py\n' + ''.join(
            f'{name} = {value!r}\n' for name, value in parameters.items())
    return notebook


def _smoke_flags() -> list[str]:
    """SMOKE_FLAGS as the notebook's helpers cell defines them."""
    source = '\n'.join(cell.source for cell in _read_notebook().cells if cell.cell_type == 'code')
    start = source.index('SMOKE_FLAGS = [')
    return ast.literal_eval(source[source.index('[', start):source.index(']', start) + 1])


def _jupyter_home(jupyter_dir, monkeypatch):
    """Jupyter's and IPython's files go to the test's folder, not the home directory; kernel specs
    are looked up there first."""
    monkeypatch.setenv('JUPYTER_PATH', str(jupyter_dir))
    for name, folder in (('JUPYTER_DATA_DIR', 'data'), ('JUPYTER_RUNTIME_DIR', 'runtime'),
                         ('JUPYTER_CONFIG_DIR', 'config'), ('IPYTHONDIR', 'ipython')):
        monkeypatch.setenv(name, str(jupyter_dir / folder))
    monkeypatch.setenv('JUPYTER_PLATFORM_DIRS', '1')


def _kernel(jupyter_dir, name, prefix=()) -> str:
    """A kernel spec `name` for this interpreter (the venv's), its command after `prefix`."""
    spec_dir = jupyter_dir / 'kernels' / name
    spec_dir.mkdir(parents=True)
    (spec_dir / 'kernel.json').write_text(json.dumps({
        'argv': [*prefix, sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': f'Python 3 ({name})', 'language': 'python'}))
    return name


def _client(notebook, kernel_name, cwd):
    nbclient, _ = _jupyter()
    return nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                                   resources={'metadata': {'path': str(cwd)}})


def _outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]


def _text(cell) -> str:
    return ''.join(output.get('text', '') for output in cell.outputs if output.output_type == 'stream')


def _cell_index(notebook, source_start: str) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if cell.source.startswith(source_start))


def test_notebook_is_stored_clean():
    """No outputs or execution counts in the repository, and one parameters cell (papermill's tag)
    whose values Colab shows as a form; the repository URL is the one placeholder the setup explains."""
    notebook = _read_notebook()
    assert notebook.nbformat == 4
    code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert [cell for cell in code_cells if 'parameters' in cell.metadata.get('tags', [])] == code_cells[:1]
    parameters = code_cells[0].source
    assert "REPO_URL = 'https://github.com/YOUR-ACCOUNT/allflax.git'  #@param {type:\"string\"}" in parameters
    assert 'YOUR-ACCOUNT' in code_cells[2].source and 'REPO_URL' in notebook.cells[0].source


def _kill_when_checkpointed(workdir: str, step: int, seen: dict):
    """SIGKILLs the `main.py` training `workdir` once its checkpoint of `step` is on disk, as a
    Colab runtime that disconnects: no signal handler runs, the lock stays behind."""
    marker = f'--workdir={workdir}'.encode()
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while time.monotonic() < deadline and not os.path.isdir(os.path.join(workdir, 'checkpoints', str(step))):
        time.sleep(0.01)
    for cmdline in glob.glob('/proc/[0-9]*/cmdline'):
        try:
            with open(cmdline, 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            continue
        if any(arg.endswith(b'main.py') for arg in argv) and marker in argv:
            pid = int(cmdline.split('/')[2])
            os.kill(pid, signal.SIGKILL)
            seen.update(pid=pid, checkpoints=sorted(os.listdir(os.path.join(workdir, 'checkpoints'))))
            with open(os.path.join(workdir, 'run.lock')) as f:
                seen['lock'] = json.load(f)
            return


def test_colab_runtime_rehearsal_drive_reset_and_resume(tmp_path, monkeypatch):
    """A Colab TPU runtime's day: Drive without hard links, Colab's variables, a disconnect that
    kills training midway, and "Run all" again on a new runtime (new hostname, local disk lost).
    The rerun resumes from Drive's checkpoint, and its test metrics equal an uninterrupted run's."""
    jupyter_dir = tmp_path / 'jupyter'
    _jupyter_home(jupyter_dir, monkeypatch)
    first_runtime = _kernel(jupyter_dir, 'colab-runtime-1', colab.new_hostname_command('colab-runtime-1'))
    second_runtime = _kernel(jupyter_dir, 'colab-runtime-2', colab.new_hostname_command('colab-runtime-2'))
    for name, value in colab.COLAB_TPU_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)  # allflax itself keeps JAX off the absent TPU.
    monkeypatch.delenv('ALLFLAX_COMPILATION_CACHE', raising=False)  # SMOKE mode keeps it on local disk.
    # LLVM at -O0: the runs are a few steps each, mostly compilation (~20 % less CPU time).
    monkeypatch.setenv('XLA_FLAGS', f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
    monkeypatch.setenv('ALLFLAX_LOCK_LEASE_SECONDS', '3')  # The reset's wait for the old lease, shortened.
    local_disk = tmp_path / 'local'
    monkeypatch.setenv('ALLFLAX_NOTEBOOK_LOCAL', str(local_disk))
    parameters = dict(SMOKE=True, USE_DRIVE=True, IMAGENET=False, DRIVE_MOUNT=str(tmp_path / 'drive'),
                      RECIPES=list(RUNS))
    transcript = []

    with colab.drive_mount(tmp_path / 'drive_storage', tmp_path / 'drive'):
        runs_root = tmp_path / 'drive' / 'MyDrive' / 'allflax'
        workdir = str(runs_root / 'vgg19_mhsa')

        # The first runtime: set-up, then the first training cell, killed after its first checkpoint.
        notebook = _read_notebook(**parameters)
        train_cell = _cell_index(notebook, "train('vgg19_mhsa')")
        killed = {}
        killer = threading.Thread(target=_kill_when_checkpointed, args=(workdir, KILL_AT_STEP, killed), daemon=True)
        client = _client(notebook, first_runtime, os.path.join(ROOT, 'notebooks'))
        nbclient, _ = _jupyter()
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells[:train_cell + 1]):
                if cell.cell_type != 'code':
                    continue
                if index == train_cell:
                    killer.start()
                try:
                    client.execute_cell(cell, index)
                except nbclient.exceptions.CellExecutionError as error:
                    assert index == train_cell, error
                    assert 'exited with status -9' in str(error)
        killer.join(timeout=5)
        assert killed, 'the training run ended before its first checkpoint could be killed'
        assert killed['lock']['host'] == 'colab-runtime-1'
        transcript.append(f"runtime 1 (hostname {killed['lock']['host']}): SIGKILL to main.py pid {killed['pid']} "
                          f"with checkpoints {killed['checkpoints']} on the Drive mount")

        # A reset: the runtime's local disk (data cache, compiled programs) is gone, Drive stays.
        assert (local_disk / 'data').is_dir() and (local_disk / 'xla').is_dir()
        subprocess.run(['rm', '-rf', str(local_disk)], check=True)

        # The second runtime, under a new hostname: Run all.
        notebook = _read_notebook(**parameters)
        _client(notebook, second_runtime, os.path.join(ROOT, 'notebooks')).execute()
        outputs = _outputs(notebook)
        assert not [output for output in outputs if output.output_type == 'error']
        setup = _text(notebook.cells[_cell_index(notebook, 'import glob')])
        assert 'tpu runtime; nothing installed (SMOKE)' in setup  # Colab's variables name a TPU runtime.
        log = _text(notebook.cells[train_cell])
        takeover = next(line for line in log.splitlines() if 'taking it over' in line)
        assert f"process {killed['pid']} on host colab-runtime-1" in takeover
        assert f'Resumed from step {KILL_AT_STEP}' in log
        left_out = "efficientnetv2_b3_se is not in RECIPES ['vgg19_mhsa']: skipped."
        assert _text(notebook.cells[_cell_index(notebook, "train('efficientnetv2_b3_se')")]).strip() == left_out
        assert _text(notebook.cells[_cell_index(notebook, "evaluate('efficientnetv2_b3_se')")]).strip() == left_out
        assert not (runs_root / 'efficientnetv2_b3_se').exists()
        transcript += [f'runtime 2 (hostname colab-runtime-2): {takeover.split("] ", 1)[-1]}',
                       f'runtime 2: Resumed from step {KILL_AT_STEP}']

        test_metrics = {}
        for run in RUNS:
            directory = runs_root / run / 'eval' / 'test'
            test_metrics[run] = json.loads((directory / 'metrics.json').read_text())
            assert test_metrics[run]['checkpoint_step'] == 24
            assert (directory / 'report.html').stat().st_size > 10_000
            assert len(list((directory / 'gradcam').glob('*.png'))) == 4
        assert json.loads((runs_root / VARIANT / 'config.json').read_text())['model']['options']['dropout_rate'] == 0.3
        compare = json.loads((runs_root / 'compare' / f'vgg19_mhsa_vs_{VARIANT}' / 'compare.json').read_text())
        assert compare['num_examples'] == test_metrics['vgg19_mhsa']['num_examples']
        assert 0 <= compare['mcnemar']['p_value'] <= 1
        assert not os.path.exists(os.path.join(workdir, 'run.lock'))  # Released at the end.

    # The notebook showed the reports: plots and Grad-CAM panels as images, tables as Markdown.
    images = [output for output in outputs if 'image/png' in output.get('data', {})]
    assert len(images) >= 5 + 4
    tables = [output.data['text/markdown'] for output in outputs if 'text/markdown' in output.get('data', {})]
    assert any(all(run in table for run in RUNS) and 'f1_macro' in table for table in tables)
    assert any('McNemar' in table for table in tables)

    # The same run, uninterrupted, on local disk: the resumed run's test metrics are its own. Its
    # programs are read from the second runtime's compile cache (compiling them again gives the same).
    reference = tmp_path / 'uninterrupted'
    run = subprocess.run([sys.executable, 'main.py', '--config=configs/vgg19_mhsa.py:demo', f'--workdir={reference}',
                          *_smoke_flags(), f'--config.data.cache_dir={tmp_path}/reference_cache'],
                         cwd=ROOT, capture_output=True, text=True, timeout=CELL_TIMEOUT_S,
                         env=dict(os.environ, ALLFLAX_COMPILATION_CACHE=str(local_disk / 'xla')))
    assert run.returncode == 0, run.stderr[-3000:]
    uninterrupted = json.loads((reference / 'eval' / 'test' / 'metrics.json').read_text())
    resumed = test_metrics['vgg19_mhsa']
    for name in ('accuracy', 'f1_macro', 'roc_auc', 'nll', 'num_examples'):
        assert resumed[name] == pytest.approx(uninterrupted[name], abs=1e-6), name
    assert resumed['ci95'].keys() == uninterrupted['ci95'].keys()
    for name, interval in uninterrupted['ci95'].items():
        assert resumed['ci95'][name] == pytest.approx(interval, abs=1e-6), name
    transcript.append('test metrics, resumed vs uninterrupted: ' + ', '.join(
        f'{name} {resumed[name]:.6f} vs {uninterrupted[name]:.6f}' for name in ('accuracy', 'f1_macro', 'roc_auc', 'nll')))
    print('\n'.join(['', 'Colab rehearsal:', *transcript]))


def test_setup_cell_clones_from_the_url_and_installs_for_the_runtime(tmp_path, monkeypatch):
    """'Run all' on a fresh runtime: the notebook outside any checkout clones REPO_URL (a local bare
    repository here) and installs jax[tpu] with requirements.txt, without oneDNN (a dry run here),
    then says so in one line; a placeholder URL is refused with what to set."""
    bare = tmp_path / 'allflax.git'
    subprocess.run(['git', 'clone', '--quiet', '--bare', ROOT, str(bare)], check=True)
    _jupyter_home(tmp_path / 'jupyter', monkeypatch)
    kernel = _kernel(tmp_path / 'jupyter', 'fresh-runtime')
    for name, value in colab.COLAB_TPU_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    outside = tmp_path / 'content'
    outside.mkdir()
    clone = tmp_path / 'content' / 'allflax'
    notebook = _read_notebook(REPO_URL=f'file://{bare}', CLONE_DIR=str(clone), SMOKE=False, USE_DRIVE=False,
                              WORKDIR_ROOT=str(tmp_path / 'runs'), PIP_OPTIONS=['--dry-run', '--no-index'])
    setup = _cell_index(notebook, 'import glob')
    client = _client(notebook, kernel, outside)
    with client.setup_kernel():
        for index in range(setup + 1):
            if notebook.cells[index].cell_type == 'code':
                client.execute_cell(notebook.cells[index], index)
    lines = [line for line in _text(notebook.cells[setup]).splitlines() if line.strip()]
    assert lines[0] == 'installing jax[tpu]==0.10.2 and requirements.txt (a few minutes)...'
    commit = subprocess.run(['git', '-C', str(bare), 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert lines[-1] == (f'allflax {commit} at {clone}; tpu runtime; jax[tpu]==0.10.2 + requirements.txt installed '
                         f'(dry run); runs under {tmp_path / "runs"}')
    assert (clone / 'main.py').is_file()
    assert 'onednn' not in (clone / 'requirements.txt').read_text().lower()

    # A Colab GPU runtime: the setup names it (and would install jax[cuda12]).
    for name in colab.COLAB_TPU_ENVIRONMENT:
        monkeypatch.delenv(name)
    monkeypatch.setenv('COLAB_GPU', '1')
    notebook = _read_notebook(CLONE_DIR=str(clone), SMOKE=True, USE_DRIVE=False, WORKDIR_ROOT=str(tmp_path / 'runs'))
    client = _client(notebook, kernel, outside)
    with client.setup_kernel():
        for index in range(setup + 1):
            if notebook.cells[index].cell_type == 'code':
                client.execute_cell(notebook.cells[index], index)
    assert f'at {clone}; gpu runtime; nothing installed (SMOKE)' in _text(notebook.cells[setup])

    nbclient, _ = _jupyter()
    notebook = _read_notebook(CLONE_DIR=str(tmp_path / 'nowhere'), SMOKE=True)
    client = _client(notebook, kernel, outside)
    with client.setup_kernel(), pytest.raises(nbclient.exceptions.CellExecutionError,
                                              match='REPO_URL is still the placeholder: set REPO_URL'):
        for index in range(setup + 1):
            if notebook.cells[index].cell_type == 'code':
                client.execute_cell(notebook.cells[index], index)


def _helpers() -> dict:
    """The notebook's helpers cell, run in this process."""
    source = next(cell.source for cell in _read_notebook().cells if 'def stream(command)' in cell.source)
    helpers = {}
    exec(compile(source, 'helpers cell', 'exec'), helpers)
    return helpers


@pytest.mark.parametrize('platform, listing, settings', [
    ('tpu', '  TPU_0(process=0,(0,0,0,0))  TPU v5 lite  memory: 15.7 GiB', 'tpu'),
    ('gpu', '  cuda:0  NVIDIA A100-SXM4-40GB  memory: 38.4 GiB', 'gpu'),
    ('gpu', '  cuda:0  Tesla T4  memory: 14.7 GiB', 'gpu,t4'),
])
def test_the_notebook_trains_with_the_settings_of_the_runtimes_accelerator(platform, listing, settings):
    assert _helpers()['recipe_settings'](platform, listing) == settings


@pytest.mark.parametrize('listing, runtime', [
    ('  cuda:0  Tesla T4  memory: 14.7 GiB\n', 't4 (Colab, free)'),
    ('  cuda:0  Tesla T4  memory: 14.7 GiB\n  cuda:1  Tesla T4  memory: 14.7 GiB\n', 't4 (Kaggle, free)'),
])
def test_on_a_t4_the_notebook_states_the_speed_of_the_readme_table(listing, runtime):
    """On Colab's T4 and Kaggle's two, the chips cell states each recipe's roofline as the README's
    GPU table gives it for `:gpu,t4` there."""
    text = _helpers()['expected_speed']('gpu,t4', listing, ROOT)
    with open(os.path.join(ROOT, 'README.md')) as f:
        rows = [line.split(' | ') for line in f if f'`gpu,t4` | {runtime} |' in line]
    assert len(rows) == 2
    for row in rows:
        model, images_per_second = row[0].strip('| ').split()[0], row[-1].split()[0]
        assert f'{model}: at most {images_per_second} images/s' in text, (model, text)


def test_interrupting_a_training_cell_saves_a_checkpoint_and_shows_its_message(tmp_path, capsys):
    """The cell's stop button raises KeyboardInterrupt in the kernel: the helper passes SIGINT on to
    the training process, waits for its checkpoint, and shows the message that says so."""
    helpers = _helpers()
    workdir = tmp_path / 'run'
    command = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/vgg19_mhsa.py:demo',
               f'--workdir={workdir}', *_smoke_flags(), '--config.total_steps=100000',
               f'--config.data.cache_dir={tmp_path}/cache']

    def interrupt_when_training():
        while not (workdir / 'metrics.jsonl').exists():  # The first steps are logged.
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # What Jupyter's interrupt does to the kernel.

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_training, daemon=True).start()
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            with pytest.raises(KeyboardInterrupt, match=r'stopped \(status 130\); run the cell again to resume'):
                helpers['stream'](command)
        finally:
            os.chdir(cwd)
    finally:
        signal.signal(signal.SIGINT, previous)
    text = capsys.readouterr().out
    assert '[interrupted: the command was asked to stop (a training run saves a checkpoint first)' in text
    message = next(line for line in text.splitlines() if line.startswith('error: SIGINT at step'))
    step = int(message.split()[4].rstrip(':'))
    assert f'saved a checkpoint of step {step} in {workdir}/checkpoints; rerun the same command to resume' in message
    assert (workdir / 'checkpoints' / str(step)).is_dir()
