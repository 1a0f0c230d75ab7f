"""An int8 copy of a bundle's ONNX model, for CPUs (`--mode=export --int8`): ONNX Runtime's static
quantisation, calibrated on training tiles, kept only where it leaves the test accuracy within
`MAX_ACCURACY_CHANGE` of the float32 model's.

Why: on a CPU, ONNX Runtime's float32 convolutions (MLAS) run VGG19+MHSA at batch 32 at about 0.7
of --mode=predict's speed (allflax's Winograd and oneDNN kernels); int8 runs it about 2x faster than
--mode=predict (benchmarks/RESULTS.md, "Bundles: the predictor of their own"). It changes some
probabilities, so the bundle keeps the float32 model too, and metadata.json states what int8 moved.
Runs where the bundle is written (it needs the `onnx` package, as export does), never in predict.py.
"""
import os
import tempfile

import numpy as np

INT8 = 'model.int8.onnx'
# The bar: test accuracy moves by less than half a point, or the int8 model is refused.
MAX_ACCURACY_CHANGE = 0.005
CALIBRATION_TILES = 64
DESCRIPTION = ('ONNX Runtime static quantisation, QDQ: Conv, MatMul and Gemm with int8 weights per output channel '
               'and uint8 activations, their ranges the min-max over {tiles} training tiles; the rest float32')


class QuantizationRefused(RuntimeError):
    """The int8 model moved the test accuracy by as much as MAX_ACCURACY_CHANGE, or more."""


def calibration_tiles(train_images: np.ndarray, seed: int, count: int = CALIBRATION_TILES) -> np.ndarray:
    """`count` training tiles drawn without replacement by `seed` (all of them when fewer)."""
    order = np.random.default_rng(seed).permutation(len(train_images))[:count]
    return np.asarray(train_images)[np.sort(order)]


def quantize(model: str, calibration: np.ndarray, output: str, input_name: str = 'image'):
    """Writes `model` (an ONNX file, external data beside it allowed) quantised to int8 as the single
    file `output`, calibrated on the uint8 tiles `calibration`, 8 a batch."""
    from onnxruntime import quantization  # Here: only export with --int8 needs it.
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([{input_name: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

    class Tiles(quantization.CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output))) as folder:
        prepared = os.path.join(folder, 'prepared.onnx')
        quant_pre_process(model, prepared, skip_symbolic_shape=True, save_as_external_data=True)
        quantization.quantize_static(prepared, output, Tiles(), quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8,
                                     op_types_to_quantize=['Conv', 'MatMul', 'Gemm'])


def compare(labels: np.ndarray, float32: np.ndarray, int8: np.ndarray) -> dict:
    """What int8 changed on the test split: both accuracies, the change in points, |Δp| (max and
    mean over every image and class) and the share of images given the same class (argmax).
    Raises QuantizationRefused when the accuracy moves by MAX_ACCURACY_CHANGE or more."""
    labels, float32, int8 = np.asarray(labels), np.asarray(float32, np.float64), np.asarray(int8, np.float64)
    float_accuracy = float(np.mean(float32.argmax(1) == labels))
    int8_accuracy = float(np.mean(int8.argmax(1) == labels))
    change = int8_accuracy - float_accuracy
    if abs(change) >= MAX_ACCURACY_CHANGE:
        raise QuantizationRefused(
            f'the int8 model moves test accuracy from {float_accuracy:.4f} to {int8_accuracy:.4f} '
            f'({100 * change:+.2f} points, {len(labels)} images; at most ±{100 * MAX_ACCURACY_CHANGE:.1f} allowed): '
            f'no bundle written; export without --int8')
    difference = np.abs(int8 - float32)
    return {'test_images': int(len(labels)), 'float32_accuracy': float_accuracy, 'int8_accuracy': int8_accuracy,
            'accuracy_change_points': 100 * change,
            'max_abs_probability_difference': float(difference.max()) if difference.size else 0.0,
            'mean_abs_probability_difference': float(difference.mean()) if difference.size else 0.0,
            'same_class': float(np.mean(int8.argmax(1) == float32.argmax(1))) if len(labels) else 1.0}
