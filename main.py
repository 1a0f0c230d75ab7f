"""allflax: train and evaluate the ALL classification recipes.

  python main.py --config=configs/vgg19_mhsa.py:demo --workdir=runs/vgg19_mhsa_demo
  python main.py --mode=eval --workdir=runs/vgg19_mhsa_demo
"""
import json
import os

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from allflax import evaluate, platform, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/vgg19_mhsa.py[:demo].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if possible) or eval.')
flags.DEFINE_integer('checkpoint_step', None, 'eval: the step to restore (default: the latest).')
flags.mark_flag_as_required('workdir')


def _config_for_eval(workdir: str) -> ConfigDict:
    if FLAGS.config is not None:
        return FLAGS.config
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise app.UsageError(f'{path} not found: pass --config, or train into {workdir} first')
    with open(path) as f:
        return ConfigDict(json.load(f))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    platform.initialize()
    if FLAGS.mode == 'train':
        if FLAGS.config is None:
            raise app.UsageError('--config is required to train')
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        values = evaluate.evaluate(_config_for_eval(FLAGS.workdir), FLAGS.workdir,
                                   checkpoint_step=FLAGS.checkpoint_step)
        logging.info('accuracy %.4f at step %d', values['accuracy'], values['checkpoint_step'])
        print(json.dumps({k: values[k] for k in ('accuracy', 'f1_macro', 'roc_auc', 'checkpoint_step')}))


if __name__ == '__main__':
    app.run(main)
