"""allflax: train and evaluate the ALL classification recipes.

  python main.py --config=configs/vgg19_mhsa.py:demo --workdir=runs/vgg19_mhsa_demo
  python main.py --mode=eval --workdir=runs/vgg19_mhsa_demo [--split=test]
  python main.py --mode=predict --workdir=runs/vgg19_mhsa_demo --input=cells/ --output=preds.csv [--gradcam]
  python main.py --mode=export --workdir=runs/vgg19_mhsa_demo --output=bundles/vgg19_mhsa_demo
  python main.py --mode=compare --workdirs=runs/a,runs/b [--split=test] [--output_dir=.]
  python main.py --mode=montecarlo --config=configs/efficientnetv2_b3_se.py --workdir=runs/mc
"""
import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from allflax import files, runtime
from allflax.data import membership
from allflax.deploy import bundle, quantize
from allflax.models import imagenet
from allflax.training import checkpoints, config_check, loop, resume_check, workdir_lock
from configs import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/vgg19_mhsa.py[:demo].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export', 'compare', 'montecarlo'],
                  'train (resumes if possible), eval (metrics, report), predict (new images), '
                  'export (a bundle for ONNX Runtime), compare (two evaluated runs), '
                  'montecarlo (repeated re-split and training).')
flags.DEFINE_integer('checkpoint_step', None, 'eval, predict, export: the step to restore (default: the latest).')
flags.DEFINE_string('split', 'test', 'eval, compare: the split to evaluate or compare.')
flags.DEFINE_list('workdirs', None, 'compare: the two run directories, A,B (differences are A − B).')
flags.DEFINE_string('output_dir', '.', 'compare: where compare.json and compare.html go.')
flags.DEFINE_string('input', None, 'predict: an image file, a folder of images or a glob pattern.')
flags.DEFINE_string('output', None, 'predict: the CSV to write (default predictions.csv); export: the bundle '
                    'folder to write.')
flags.DEFINE_bool('gradcam', False, 'predict: also write Grad-CAM panels to <output stem>_gradcam/.')
flags.DEFINE_bool('int8', False, 'export: also an int8 copy of the ONNX model for CPUs, which the bundle runs by '
                  'default; refused if it moves test accuracy by half a point.')


def _config_of_run(workdir: str) -> ConfigDict:
    """--config if given, else the run's config.json, with sections added since it was written."""
    if FLAGS.config is not None:
        return loop.resolve_input_convention(FLAGS.config)
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: pass --config, or train into {workdir} first')
    with open(path) as f:
        try:
            config = ConfigDict(json.load(f))
        except json.JSONDecodeError as error:
            raise config_check.ConfigError(f'{path} is not valid JSON ({error}): restore it, or pass --config '
                                        f'with the recipe the run was trained with') from None
    if 'eval' not in config:
        config.eval = common.eval_config()
    return config


def _mode(name: str):
    """The module of a mode, imported when it runs: a usage error or another mode does not wait
    for every mode's imports (benchmarks/RESULTS.md, "The suite on an AVX2-only host")."""
    return importlib.import_module(f'allflax.modes.{name}')


class MissingFlag(ValueError):
    """A flag this mode needs: said in one line, not after the whole flag help."""
    exit_code = 2  # As absl's usage errors.


def _require(name: str):
    if getattr(FLAGS, name) is None:
        raise MissingFlag(f'--{name} is required for --mode={FLAGS.mode} (python main.py --helpfull lists the flags)')


# Errors whose message says all a user needs: printed as one line, without a traceback.
_ONE_LINE_ERRORS = (loop.Interrupted, loop.Diverged, workdir_lock.WorkdirBusyError, resume_check.ResumeMismatchError,
                    config_check.ConfigError, FileNotFoundError, MissingFlag, checkpoints.CheckpointError,
                    imagenet.WeightsUnavailableError, imagenet.InputConventionError, bundle.BundleError,
                    files.OutputRefused, membership.SplitsChanged, quantize.QuantizationRefused)


def main(argv):
    try:
        _run(argv)
    except _ONE_LINE_ERRORS as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(getattr(error, 'exit_code', 1))  # A signal's code for an interrupted run.


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    runtime.initialize()
    if FLAGS.mode == 'compare':
        _require('workdirs')
        result = _mode('compare').compare(FLAGS.workdirs, FLAGS.split, FLAGS.output_dir)
        print(json.dumps({'mcnemar': result['mcnemar'], 'difference_a_minus_b': result['difference_a_minus_b']}))
        return
    _require('workdir')
    if FLAGS.mode in ('train', 'montecarlo'):
        _require('config')
        if FLAGS.mode == 'train':
            _mode('train').run(FLAGS.config, FLAGS.workdir)
        else:
            summary = _mode('montecarlo').run(FLAGS.config, FLAGS.workdir)
            print(json.dumps({name: summary['metrics'][name] for name in ('accuracy', 'f1_macro')}))
    elif FLAGS.mode == 'eval':
        values = _mode('evaluate').evaluate(_config_of_run(FLAGS.workdir), FLAGS.workdir, split_name=FLAGS.split,
                                            checkpoint_step=FLAGS.checkpoint_step)
        logging.info('accuracy %.4f at step %d', values['accuracy'], values['checkpoint_step'])
        print(json.dumps({k: values[k] for k in ('accuracy', 'f1_macro', 'roc_auc', 'checkpoint_step')}))
    elif FLAGS.mode == 'export':
        _require('output')
        summary = _mode('export').export(_config_of_run(FLAGS.workdir), FLAGS.workdir, FLAGS.output,
                                         checkpoint_step=FLAGS.checkpoint_step, int8=FLAGS.int8)
        print(json.dumps(summary))
    else:
        _require('input')
        summary = _mode('predict').predict(_config_of_run(FLAGS.workdir), FLAGS.workdir, FLAGS.input,
                                           FLAGS.output or 'predictions.csv', gradcam=FLAGS.gradcam,
                                           checkpoint_step=FLAGS.checkpoint_step)
        print(json.dumps(summary))


if __name__ == '__main__':
    app.run(main)
