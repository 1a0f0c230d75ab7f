"""`python -m allflax.aot.check` compiles a recipe's train step for a TPU on this CPU host and
reports its HBM use, FLOPs and roofline (a subprocess: main.py, imported by other tests, defines
the same --config flag)."""
import json
import os
import subprocess
import sys

import pytest

from allflax.aot import check as tpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_train_step_on_a_v5e_chip(tmp_path):
    """The VGG19+MHSA demo's train step at 32 px (20-50 s on 2 shared cores, most of it
    compiling; the eval step would add a third for no new code path here)."""
    output = tmp_path / 'check.json'
    subprocess.run([sys.executable, '-m', 'allflax.aot.check', '--config=configs/vgg19_mhsa.py:demo',
                    '--config.data.image_size=32', '--config.batch_size=8', '--topology=v5e:1x1',
                    '--steps=train', f'--output={output}'],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads(output.read_text())
    assert (report['topology'], report['device_kind'], report['chips']) == ('v5e:1x1', 'TPU v5 lite', 1)
    assert (report['global_batch'], report['per_chip_batch'], report['num_classes']) == (8, 8, 4)
    assert 'eval' not in report
    train = report['train']
    hbm = train['hbm_per_chip_gib']
    # VGG19+MHSA's 21.2 M float32 weights and AdamW's two moments, 12 bytes each: ~0.24 GiB.
    assert 0.2 < hbm['arguments'] < 0.3
    assert 0 < hbm['total'] < train['hbm_capacity_gib'] == 16
    assert train['fits'] is True
    # VGG19's forward pass at 224 px is ~39 GFLOP, at 32 px 1/49 of it (~0.8); a train step is
    # about 3 forward passes (1.9 GFLOP per image measured).
    assert 1e9 < train['flops_per_image'] < 4e9
    assert train['bytes_accessed_per_chip'] > 0
    assert train['roofline']['images_per_second_per_chip'] > 0
    assert train['compile_seconds'] > 0


@pytest.mark.parametrize('topology, devices, chips', [('v5e:2x2', 4, 4), ('v2:2x2', 8, 4), ('v4:2x2x1', 4, 4)])
def test_topology_devices(topology, devices, chips):
    """v2 shows a chip's 2 cores as 2 devices; v4 as one (megacore), as JAX does on those hosts."""
    chip, found = tpu_check.topology_devices(topology)
    assert chip.name == topology.split(':')[0]
    assert (len(found), len({tuple(d.coords) for d in found})) == (devices, chips)


@pytest.mark.parametrize('topology', ['v7x:2x2', 'v5e', 'v5e:2xa', 'v5e:3x5'])
def test_unknown_topology_is_refused(topology):
    with pytest.raises(ValueError, match='TPU topology'):
        tpu_check.topology_devices(topology)


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(tpu_check.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ValueError, match='pip install -r requirements-test.txt'):
        tpu_check.topology_devices('v5e:1x1')


def test_table_rows_name_cloud_types_and_say_what_does_not_fit():
    def report(chip, chips, per_chip, micro, total, fits):
        return {'model': 'm', 'chip': chip, 'chips': chips, 'per_chip_batch': per_chip,
                'train': {'micro_batches': micro, 'hbm_per_chip_gib': {'total': total}, 'hbm_capacity_gib': 16,
                          'fits': fits, 'flops_per_image': 2e10,
                          'roofline': {'images_per_second_per_chip': 99.6, 'bound': 'memory'}}}

    reports = [report('v4', 4, 64, 1, 15.0, False), report('v5e', 1, 256, 4, 3.94, True),
               report('v5e', 8, 32, 1, 2.2, True)]
    rows = tpu_check.table(reports).splitlines()[2:]
    assert rows == ['| m | v5e-1 (Colab) | 1 | 256 (4 × 64) | 3.9 / 16 | yes | 20 | 100 (memory) |',
                    '| m | v4-8 | 4 | 64 | 15.0 / 16 | **no** | 20 | 100 (memory) |',
                    '| m | v5e-8 (Kaggle, free) | 8 | 32 | 2.2 / 16 | yes | 20 | 100 (memory) |']


def test_table_names_a_file_that_is_not_a_report(tmp_path):
    (tmp_path / 'a.json').write_text('{"model": "m"}')
    with pytest.raises(ValueError, match=r"a\.json is not an aot_check \(tpu_check\) report .*rerun the check"):
        tpu_check.read_reports(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot list aot_check \(tpu_check\) reports"):
        tpu_check.read_reports(str(tmp_path / 'missing'))


def test_the_readme_table_is_the_reports_table():
    """README.md's TPU table is `python -m allflax.aot.check --table=benchmarks/tpu_check`, row for
    row, and every recipe's `:tpu` fits every topology there."""
    reports = tpu_check.read_reports(os.path.join(ROOT, 'benchmarks', 'tpu_check'))
    expected = tpu_check.table(reports)
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert expected in f.read(), 'README.md: paste the output of python -m allflax.aot.check --table=benchmarks/tpu_check'
    assert all(report['train']['fits'] and report['config'].endswith(':tpu') for report in reports)
    assert {(report['model'], tpu_check.accelerator_type(report['chip'], report['chips'])) for report in reports} == {
        (model, name) for model in ('vgg19_mhsa', 'efficientnetv2_b3_se')
        for name in ('v2-8', 'v5e-1', 'v6e-1', 'v5e-8', 'v4-8')}
