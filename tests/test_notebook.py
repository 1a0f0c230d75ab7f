"""notebooks/colab_tpu.ipynb runs top to bottom: executed in SMOKE mode on the CPU, with its
parameters injected as papermill does, by a Jupyter kernel on this interpreter."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')
CELL_TIMEOUT_S = 600
RUNS = ('vgg19_mhsa', 'efficientnetv2_b3_se')
VARIANT = 'vgg19_mhsa_dropout0.3'


def _jupyter():
    """nbclient and nbformat, failing (never skipping) where the test requirements are missing."""
    try:
        import ipykernel  # noqa: F401  (the kernel the notebook runs in)
        import nbclient
        import nbformat
    except ImportError as error:
        pytest.fail(f'{error.name} is not installed: run `make test` (it installs the test requirements, '
                    f'requirements-test-notebook.txt)')
    return nbclient, nbformat


def _read_notebook():
    _, nbformat = _jupyter()
    return nbformat.read(NOTEBOOK, as_version=4)


def _inject_parameters(notebook, **parameters):
    """Appends assignments to the cell tagged `parameters`, as papermill's injected cell would."""
    cells = [cell for cell in notebook.cells if 'parameters' in cell.metadata.get('tags', [])]
    assert len(cells) == 1, f'{len(cells)} cells tagged parameters'
    cells[0].source += '\n\n# Injected by tests/test_notebook.py\n' + ''.join(
        f'{name} = {value!r}\n' for name, value in parameters.items())


def _kernel_on_this_interpreter(jupyter_dir, monkeypatch):
    """A `python3` kernel spec for this interpreter (the venv's), found first through JUPYTER_PATH;
    Jupyter's and IPython's own files go to the test's folder, not the home directory."""
    spec_dir = jupyter_dir / 'kernels' / 'python3'
    spec_dir.mkdir(parents=True)
    (spec_dir / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'Python 3 (allflax test)', 'language': 'python'}))
    monkeypatch.setenv('JUPYTER_PATH', str(jupyter_dir))
    for name, folder in (('JUPYTER_DATA_DIR', 'data'), ('JUPYTER_RUNTIME_DIR', 'runtime'),
                         ('JUPYTER_CONFIG_DIR', 'config'), ('IPYTHONDIR', 'ipython')):
        monkeypatch.setenv(name, str(jupyter_dir / folder))
    monkeypatch.setenv('JUPYTER_PLATFORM_DIRS', '1')


def test_notebook_is_stored_clean():
    """No outputs or execution counts in the repository, and one parameters cell (papermill's tag)."""
    notebook = _read_notebook()
    assert notebook.nbformat == 4
    code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert [cell for cell in code_cells if 'parameters' in cell.metadata.get('tags', [])] == code_cells[:1]


def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    nbclient, _ = _jupyter()
    notebook = _read_notebook()
    _inject_parameters(notebook, SMOKE=True, USE_DRIVE=False, IMAGENET=False)
    _kernel_on_this_interpreter(tmp_path / 'jupyter', monkeypatch)
    runs_root = tmp_path / 'runs'
    monkeypatch.setenv('ALLFLAX_NOTEBOOK_WORKDIR', str(runs_root))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    # LLVM at -O0: the runs are a few steps each, mostly compilation (~20 % less CPU time).
    monkeypatch.setenv('XLA_FLAGS', f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
    monkeypatch.delenv('ALLFLAX_COMPILATION_CACHE', raising=False)  # SMOKE mode keeps it with the runs.

    # From the notebook's own folder, so its setup cell has to find the checkout above it.
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                     resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == 'error']
    test_metrics = {}
    for run in RUNS:
        directory = runs_root / run / 'eval' / 'test'
        test_metrics[run] = json.loads((directory / 'metrics.json').read_text())
        assert 0 <= test_metrics[run]['accuracy'] <= 1
        assert test_metrics[run]['checkpoint_step'] == 24
        assert (directory / 'report.html').stat().st_size > 10_000
        assert len(list((directory / 'gradcam').glob('*.png'))) == 4
    assert json.loads((runs_root / VARIANT / 'config.json').read_text())['model']['options']['dropout_rate'] == 0.3
    compare = json.loads((runs_root / 'compare' / f'vgg19_mhsa_vs_{VARIANT}' / 'compare.json').read_text())
    assert compare['num_examples'] == test_metrics['vgg19_mhsa']['num_examples']
    assert 0 <= compare['mcnemar']['p_value'] <= 1
    # The data and compilation caches went to the runs' folder, not the home directory.
    assert (runs_root / 'cache').is_dir() and (runs_root / 'xla_cache').is_dir()

    # The notebook showed the reports: plots and Grad-CAM panels as images, tables as Markdown.
    images = [output for output in outputs if 'image/png' in output.get('data', {})]
    assert len(images) >= 2 * (5 + 4)
    tables = [output.data['text/markdown'] for output in outputs if 'text/markdown' in output.get('data', {})]
    assert any(all(run in table for run in RUNS) and 'f1_macro' in table for table in tables)
    assert any('McNemar' in table for table in tables)
