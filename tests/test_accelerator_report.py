"""benchmarks.accelerator_report: the peak table's matching, the MFU arithmetic, the n/a case."""
import json

import pytest

from benchmarks import accelerator_report

# As benchmarks.throughput prints them (the fields the report reads, and one it ignores).
H200 = {'model': 'vgg19_mhsa', 'image_size': 224, 'batch_size': 128, 'head': 'model', 'dtype': 'bfloat16',
        'train_images_per_sec': 2000.0, 'eval_images_per_sec': 6000.0, 'compile_seconds': 40.0,
        'flops_per_image': 113e9, 'memory': {'peak_bytes_in_use': 3 * 2 ** 30, 'bytes_limit': 100 * 2 ** 30},
        'device': 'NVIDIA H200', 'cpus': 16}
UNKNOWN = {**H200, 'model': 'efficientnetv2_b3_se', 'image_size': 300, 'flops_per_image': 18e9,
           'train_images_per_sec': 1500.0, 'memory': None, 'device': 'NVIDIA RTX 9999'}


def test_mfu_is_train_flops_per_second_over_the_dense_bf16_peak():
    assert accelerator_report.mfu(H200) == pytest.approx(113e9 * 2000 / 989e12)  # 0.2285: 22.9 %
    assert accelerator_report.peak_memory_gib(H200) == 3.0


def test_unknown_gpu_and_missing_memory_are_none():
    assert accelerator_report.mfu(UNKNOWN) is None
    assert accelerator_report.peak_memory_gib(UNKNOWN) is None


@pytest.mark.parametrize('device_kind, tflops', [
    ('NVIDIA H200', 989), ('NVIDIA H200 NVL', 835), ('NVIDIA GH200 480GB', 989), ('NVIDIA H100 80GB HBM3', 989),
    ('NVIDIA H100 PCIe', 756), ('NVIDIA A100-SXM4-80GB', 312), ('NVIDIA A100 80GB PCIe', 312),
    ('NVIDIA L4', 121), ('NVIDIA L40S', 362), ('NVIDIA A10G', 70), ('NVIDIA A10', 125), ('cpu', None)])
def test_peak_table_matches_the_most_specific_name(device_kind, tflops):
    assert accelerator_report.peak_tflops(device_kind) == tflops


def test_report_reads_json_lines_among_other_output_and_prints_both_rows(tmp_path, capsys):
    results = tmp_path / 'results.jsonl'
    results.write_text('\n'.join(['compiling...', json.dumps(H200), '{"block_step_seconds": [0.1]}',
                                  json.dumps(UNKNOWN)]) + '\n')
    assert accelerator_report.main(['accelerator_report', str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    vgg = next(line for line in lines if line.startswith('vgg19_mhsa'))
    b3 = next(line for line in lines if line.startswith('efficientnetv2_b3_se'))
    assert vgg.split()[4:9] == ['2000.0', '6000.0', '113.0', '3.00', '22.9%']
    assert b3.split()[4:9] == ['1500.0', '6000.0', '18.0', 'n/a', 'n/a']
    assert lines[-1] == 'MFU n/a: no published bf16 peak in benchmarks/accelerator_report.py for NVIDIA RTX 9999'


def test_report_without_records_fails(tmp_path):
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('Traceback (most recent call last):\n')
    assert accelerator_report.main(['accelerator_report', str(empty)]) == 1


def test_rows_show_the_aot_prediction_for_the_same_gpu_model_and_batch(tmp_path, capsys):
    """benchmarks/accelerator_check.sh prints the ahead-of-time check's memory and roofline beside
    what it measured; a GPU or batch without a report gets n/a."""
    report = {'platform': 'gpu', 'devices': 1, 'device_kind': 'NVIDIA H200', 'model': 'vgg19_mhsa',
              'dtype': 'bfloat16', 'global_batch': 128,
              'train': {'hbm_per_chip_gib': {'total': 6.434}, 'roofline': {'images_per_second_per_chip': 8731.6}}}
    (tmp_path / 'vgg19_mhsa_h200.json').write_text(json.dumps(report))
    (tmp_path / 'eight.json').write_text(json.dumps({**report, 'devices': 8}))
    results = tmp_path / 'results.jsonl'
    results.write_text('\n'.join(map(json.dumps, [H200, {**H200, 'batch_size': 256}])) + '\n')
    assert accelerator_report.main(['accelerator_report', f'--predictions={tmp_path}', str(results)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith('vgg19_mhsa')]
    assert [row[10:12] for row in rows] == [['6.43', '8732'], ['n/a', 'n/a']]


def test_a_float16_row_counts_its_skipped_steps(tmp_path, capsys):
    """On a T4, float16 beside float32: the steps the loss scale skipped, of those run; n/a in float32."""
    t4 = {**H200, 'device': 'Tesla T4', 'train_images_per_sec': 250.0}
    results = tmp_path / 'results.jsonl'
    results.write_text('\n'.join(map(json.dumps, [
        {**t4, 'dtype': 'float16', 'train_steps_run': 21, 'skipped_steps': 2, 'loss_scale': 16384.0},
        {**t4, 'dtype': 'float32', 'batch_size': 64, 'train_steps_run': 21, 'skipped_steps': None}])) + '\n')
    assert accelerator_report.main(['accelerator_report', str(results)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith('vgg19_mhsa')]
    assert [(row[3], row[12]) for row in rows] == [('float16', '2/21'), ('float32', 'n/a')]
