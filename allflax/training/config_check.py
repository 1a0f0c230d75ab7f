"""Config values rejected before any compilation or data preparation is spent on them, each
named with the flag that fixes it."""
import math
import os
from collections.abc import Collection

_ABSENT = object()


class ConfigError(ValueError):
    """A config value that cannot train."""


# The networks downsample by 32 (VGG's five pools, EfficientNetV2's and ResNet's strides), and the
# synthetic sets draw cells no smaller.
MIN_IMAGE_SIZE = 32


def validate_config(config, *, synthetic_names: Collection[str], real_names: Collection[str],
                    model_names: Collection[str] = (), augment_names: Collection[str] = ()) -> None:
    """Raises ConfigError naming every invalid value of an ml_collections config, before a run spends
    minutes compiling or preparing data for it. Keys the config lacks (older runs) are not checked.

    `synthetic_names` and `real_names` are the data sets of allflax.data.sources (synthetic.CLASS_NAMES
    and REAL), `model_names` the registered models and `augment_names` the augmentation ops, passed
    in so that this module stays free of JAX and the image libraries; empty: not checked.
    """
    problems = []

    def check(key: str, ok, rule: str) -> None:
        value = _lookup(config, key)
        if value is not _ABSENT and not ok(value):
            problems.append(f'{key}={_one_line(value)} {rule}; set --config.{key}')

    check('total_steps', lambda v: v >= 0, 'must be >= 0 (0 trains for num_epochs)')
    check('num_epochs', lambda v: v >= 0, 'must be >= 0')
    check('batch_size', lambda v: v >= 1, 'must be >= 1 (the global batch, over all devices)')
    for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
        check(key, lambda v: v >= 1, 'must be >= 1 step')
    check('keep_checkpoints', lambda v: v >= 1, 'must be >= 1')
    check('dtype', lambda v: v in ('float32', 'bfloat16', 'float16'),
          'must be float32, bfloat16 or float16 (the compute dtype; parameters stay float32)')
    check('data.image_size', lambda v: v >= MIN_IMAGE_SIZE, f'must be >= {MIN_IMAGE_SIZE} pixels (the networks '
          f'downsample by {MIN_IMAGE_SIZE})')
    if model_names:
        check('model.name', lambda v: v in model_names, f'is not a model: use one of {", ".join(model_names)}')
    if augment_names:
        check('data.augment', lambda v: not set(v) - set(augment_names),
              f'names an unknown op: use some of {", ".join(augment_names)}')
    check('model.init_from', lambda v: v in ('', 'imagenet') or os.path.isdir(v),
          "must be '' (from scratch), 'imagenet', or a directory written by python -m allflax.models.keras_weights")
    check('data.num_workers', lambda v: v >= 0, 'must be >= 0 (0 reads in the main process)')
    check('data.split', lambda v: v in ('patient', 'official', 'random'), 'must be patient, official or random')
    check('data.split_fractions', lambda v: all(f >= 0 for f in v.values()) and math.isclose(
        sum(v.values()), 1, abs_tol=1e-6), 'must be >= 0 and sum to 1')
    check('optimizer.learning_rate', lambda v: v > 0, 'must be > 0')
    check('optimizer.warmup_fraction', lambda v: 0 <= v <= 1, 'must be in [0, 1] (a fraction of total steps)')
    check('optimizer.weight_decay', lambda v: v >= 0, 'must be >= 0')
    check('loss.gamma', lambda v: v >= 0, 'must be >= 0 (0 is plain sigmoid cross-entropy)')
    if _lookup(config, 'total_steps') == 0 and _lookup(config, 'num_epochs') == 0:
        problems.append('total_steps=0 and num_epochs=0 train nothing; set --config.total_steps or '
                        '--config.num_epochs')

    name, data_dir = _lookup(config, 'data.name'), _lookup(config, 'data.dir')
    if name in synthetic_names and data_dir not in (_ABSENT, ''):
        problems.append(f'data.dir={data_dir!r} is ignored by the synthetic data set {name}: set '
                        f'--config.data.name to a real data set ({", ".join(real_names)}) or drop data.dir')
    elif name in real_names and data_dir in (_ABSENT, ''):
        problems.append(f'data.name={name!r} reads images from data.dir, which is empty: set --config.data.dir '
                        f'to the downloaded folder')
    elif name is not _ABSENT and name not in synthetic_names and name not in real_names:
        problems.append(f'data.name={name!r} is unknown: set --config.data.name to one of '
                        f'{", ".join([*synthetic_names, *real_names])}')
    if len(problems) == 1:
        raise ConfigError(f'invalid config: {problems[0]}')
    if problems:
        raise ConfigError('invalid config:\n' + '\n'.join(f'  {line}' for line in problems))


def _one_line(value) -> str:
    """repr on one line: a ConfigDict's (data.split_fractions) is YAML over several lines."""
    to_dict = getattr(value, 'to_dict', None)
    return repr(to_dict() if callable(to_dict) else value)


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        if part not in node:
            return _ABSENT
        node = node[part]
    return node
