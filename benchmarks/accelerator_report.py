"""The table `benchmarks/accelerator_check.sh` prints: per recipe, images/s (train, eval), the
device allocator's peak memory and MFU, from the JSON lines `benchmarks.throughput` printed.
Imports no JAX: it runs, and is tested, anywhere.

  python -m benchmarks.accelerator_report [--predictions=benchmarks/gpu_check] results.jsonl [...]
  (or lines on stdin)

With --predictions, each row also shows what `python -m allflax.aot.check` predicted, compiling
without a GPU, for the same model, batch and GPU (one device, same device_kind): train GiB per
device and roofline images/s, so that the README's GPU table can be corrected where they disagree.

skipped: float16 steps whose gradients overflowed (changing nothing but the loss scale), of the
train steps run; n/a in other dtypes.

MFU = train FLOPs per image (XLA's cost analysis of the whole train step: forward, backward,
update) × train images/s ÷ the GPU's published dense bfloat16 peak. The peak is the datasheet's
headline, not what a matrix product reaches (an H200 ran 8192³ bf16 products at ~790 TFLOP/s here).
"""
import json
import os
import re
import sys

# Dense (no sparsity) bfloat16 Tensor Core peaks in TFLOP/s, from NVIDIA's datasheets (their
# figures "with sparsity" halved): H100 and H200 (SXM and NVL columns), GH200, A100 (SXM and
# PCIe alike), L40S, L40, L4, A10. The A10G (AWS G5) has no NVIDIA datasheet: 70 is the figure
# commonly quoted for it (~half the A10's). Matched against `jax.devices()[0].device_kind`
# (e.g. 'NVIDIA H200', 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA L4'), first match wins: the more specific names come first.
PEAK_BF16_TFLOPS = (
    (r'\bGH200\b', 989.0),
    (r'\bH200 NVL\b', 835.0),
    (r'\bH200\b', 989.0),
    (r'\bH100 NVL\b', 835.0),
    (r'\bH100 PCIe\b', 756.0),
    (r'\bH100\b', 989.0),  # SXM: 'NVIDIA H100 80GB HBM3'.
    (r'\bA100\b', 312.0),
    (r'\bL40S\b', 362.0),
    (r'\bL40\b', 181.0),
    (r'\bL4\b', 121.0),
    (r'\bA10G\b', 70.0),
    (r'\bA10\b', 125.0),
)
GIB = 2 ** 30


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of the GPU `device_kind` names; None for one not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return tflops
    return None


def mfu(record: dict) -> float | None:
    """Model FLOPs utilisation of the train step (0..1); None on an unknown device."""
    peak = peak_tflops(record.get('device', ''))
    if peak is None:
        return None
    return record['flops_per_image'] * record['train_images_per_sec'] / (peak * 1e12)


def peak_memory_gib(record: dict) -> float | None:
    """The device allocator's peak bytes in use, in GiB; None where the device reported none."""
    memory = record.get('memory') or {}
    peak = memory.get('peak_bytes_in_use')
    return None if peak is None else peak / GIB


def read_records(lines) -> list[dict]:
    """The throughput records among `lines` (other output is skipped)."""
    records = []
    for line in lines:
        line = line.strip()
        if not line.startswith('{'):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and 'train_images_per_sec' in record:
            records.append(record)
    return records


def read_predictions(directory: str) -> list[dict]:
    """The one-GPU aot_check reports (*.json) in `directory`."""
    reports = []
    for name in sorted(os.listdir(directory)):
        if name.endswith('.json'):
            with open(os.path.join(directory, name)) as file:
                report = json.load(file)
            if report.get('platform') == 'gpu' and report.get('devices') == 1 and 'train' in report:
                reports.append(report)
    return reports


def prediction(record: dict, predictions: list[dict]) -> dict | None:
    """The report of the same model, dtype and batch on the record's GPU, if there is one. The
    recipe's train step augments more than the benchmark's (flip and rot90): B3's roofline counts
    its rotate, crop, colour, blur and stain jitter too."""
    for report in predictions:
        if (report['device_kind'], report['model'], report['dtype'], report['global_batch']) == (
                record.get('device'), record['model'], record['dtype'], record['batch_size']):
            return report
    return None


def _number(value: float | None, digits: int) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'


def table(records: list[dict], predictions: list[dict] = ()) -> str:
    """One row per record, in a fixed-width text table; AOT columns n/a without a prediction."""
    header = ('model', 'size', 'batch', 'dtype', 'train img/s', 'eval img/s', 'train GFLOP/img',
              'peak HBM GiB', 'MFU', 'compile s', 'AOT GiB', 'AOT roofline img/s', 'skipped', 'device')
    rows = []
    for record in records:
        utilisation = mfu(record)
        predicted = prediction(record, predictions)
        train = predicted['train'] if predicted else None
        rows.append((record['model'], str(record['image_size']), str(record['batch_size']), record['dtype'],
                     _number(record['train_images_per_sec'], 1), _number(record['eval_images_per_sec'], 1),
                     _number(record['flops_per_image'] / 1e9, 1), _number(peak_memory_gib(record), 2),
                     'n/a' if utilisation is None else f'{100 * utilisation:.1f}%',
                     _number(record.get('compile_seconds'), 1),
                     _number(train and train['hbm_per_chip_gib']['total'], 2),
                     _number(train and train['roofline']['images_per_second_per_chip'], 0),
                     'n/a' if record.get('skipped_steps') is None else
                     f"{record['skipped_steps']}/{record.get('train_steps_run', '?')}",
                     record.get('device', '?')))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def main(argv: list[str]) -> int:
    predictions, paths = [], []
    for arg in argv[1:]:
        if arg.startswith('--predictions='):
            predictions = read_predictions(arg.partition('=')[2])
        else:
            paths.append(arg)
    if paths:
        lines = []
        for path in paths:
            with open(path) as file:
                lines += file.readlines()
    else:
        lines = sys.stdin.readlines()
    records = read_records(lines)
    if not records:
        print('accelerator_report: no throughput records to report', file=sys.stderr)
        return 1
    print(table(records, predictions))
    unknown = sorted({r.get('device', '?') for r in records if peak_tflops(r.get('device', '')) is None})
    if unknown:
        print(f'MFU n/a: no published bf16 peak in benchmarks/accelerator_report.py for {", ".join(unknown)}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
