"""Predictions for new image files from a trained run: the training preprocessing, the eval
prediction path (with its test-time augmentation and temperature), one CSV row per image.

Unreadable files are reported (stderr and `<output stem>.errors.csv`) and the rest predicted.
"""
import os
import re

import ml_collections
import numpy as np

from allflax import files
from allflax.data import image_files
from allflax.data.dataset import Split
from allflax.evaluation import calibration, inference, interpret, operating_point
from allflax.training import restore


# A panel of `predict --gradcam`: <index>_<image name>_pred-<class>.png.
PANEL_NAME = r'\d{4}_.*_pred-.*\.png'


def gradcam_folder(output: str) -> str:
    return os.path.splitext(output)[0] + '_gradcam'


def predict(config: ml_collections.ConfigDict, workdir: str, input_pattern: str, output: str, *,
            gradcam: bool = False, checkpoint_step: int | None = None) -> dict:
    """Writes `output` (path, predicted_class, one probability column per class) and
    `<output stem>.errors.csv`; with `gradcam`, panels into `<output stem>_gradcam/`. Refuses,
    before anything is read or written, outputs that hold files allflax did not write."""
    image_files.check_outputs(output)
    if gradcam:
        files.refuse_foreign_folder(gradcam_folder(output), 'Grad-CAM folder of predict',
                                    lambda name: re.fullmatch(PANEL_NAME, name) is not None)
    class_names = restore.run_summary(workdir)['class_names']
    restored = restore.restore(workdir, model=config.model, data=config.data,
                               dtype=config.dtype, seed=config.seed, num_classes=len(class_names),
                               checkpoint_step=checkpoint_step)
    tiles, readable, errors = image_files.read_tiles(image_files.list_inputs(input_pattern),
                                                     config.data.preprocess, config.data.image_size)
    errors_path = image_files.write_errors(output, errors)
    summary = {'output': output, 'predicted': len(readable), 'unreadable': len(errors), 'errors': errors_path,
               'checkpoint_step': restored.step}
    if not tiles:
        image_files.write_predictions(output, [], class_names, np.zeros((0, len(class_names))),
                                      operating_point.saved_rule(workdir, restored.step))
        return summary
    split = Split(np.stack(tiles), np.full(len(tiles), -1, np.int32), np.full(len(tiles), '', str), tuple(readable))
    logits = inference.predict_logits(restored.eval_step, restored.state, split, config.batch_size,
                                      restored.mesh, tta=config.eval.tta)
    temperature = calibration.saved_temperature(workdir, restored.step, scaling=config.eval.temperature_scaling)
    predicted = image_files.write_predictions(output, readable, class_names,
                                              calibration.probabilities(logits, temperature),
                                              operating_point.saved_rule(workdir, restored.step))
    if gradcam:
        explain = restore.explainer(restored, data=config.data, dtype=config.dtype, batch_size=config.batch_size)
        explanation = explain(split)
        names = [f'{i:04d}_{interpret.slug(os.path.splitext(os.path.basename(path))[0])}'
                 f'_pred-{interpret.slug(class_names[p])}' for i, (path, p) in enumerate(zip(readable, predicted))]
        images = [interpret.display_rgb(tile, config.data.preprocess) for tile in tiles]
        interpret.write_panels(gradcam_folder(output), images, explanation, predicted, names)
        summary['gradcam'] = gradcam_folder(output)
    return summary

