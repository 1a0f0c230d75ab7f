"""What a resume may change: a workdir is resumed only by the run that wrote it, with settings
that leave its result unchanged."""
import json
import os

from allflax import files
from allflax.training import workdir_lock

# Settings that do not change the trained result: a resume may change them.
_FREE_KEYS = frozenset({'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                        'data.cache_dir', 'data.dir'})
_FREE_PREFIXES = ('eval.', 'montecarlo.', 'data.facts.')
_ABSENT = object()


class ResumeMismatchError(ValueError):
    """The workdir's run was trained with settings that change the result."""


# What a run writes at the top of its workdir: a folder holding anything else (and no run's
# config.json) is not a run, and training into it is refused.
RUN_ENTRIES = frozenset({'config.json', 'splits.json', 'metrics.jsonl', 'tensorboard', 'checkpoints',
                         'checkpoints.unreadable', 'eval'})
_RUN_CONFIG_KEYS = frozenset({'model', 'data', 'optimizer', 'seed'})


def saved_run_config(workdir: str) -> dict | None:
    """The config.json of the run in `workdir`, or None where no run has written one yet. Raises
    files.OutputRefused for a folder that is not a run's: a config.json that is not an allflax
    config, or files a run does not write (training would write its files among a user's)."""
    path = os.path.join(workdir, 'config.json')
    if os.path.isfile(path) and not os.path.islink(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise files.OutputRefused(f'{path} is not an allflax run\'s config.json ({error}): restore it, or '
                                      f'train into a new --workdir') from None
        if isinstance(saved, dict) and _RUN_CONFIG_KEYS <= saved.keys():
            return saved
        raise files.OutputRefused(f'{path} is not an allflax run\'s config.json (it has no '
                                  f'{"/".join(sorted(_RUN_CONFIG_KEYS))} sections): {workdir} is not a run; '
                                  f'train into a new or empty --workdir')
    files.refuse_foreign_folder(workdir, 'run\'s workdir',
                                lambda name: name in RUN_ENTRIES or name.startswith(workdir_lock.LOCK_NAME))
    return None


def check_resume(saved: dict, new: dict, *, workdir: str, defaults: dict | None = None) -> list[str]:
    """Compares a run's config.json (`saved`) with the config it is resumed with (`new`, nested dicts).

    Resuming with a different model, data or optimisation would silently train a mix of two runs, so
    such differences raise ResumeMismatchError listing each of them. Returns one line per difference
    that leaves the result unchanged (logging, evaluation, data and cache folders, a longer
    total_steps). A key absent from `saved` (written before the setting existed) is accepted when the
    new value equals its value in `defaults`.
    """
    saved_flat, new_flat, default_flat = _flatten(saved), _flatten(new), _flatten(defaults or {})
    allowed, refused = [], []
    for key in sorted(saved_flat.keys() | new_flat.keys()):
        old, value = saved_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if _same(old, value):
            continue
        change = f'{key}: {_show(old)} -> {_show(value)}'
        if key in _FREE_KEYS or key.startswith(_FREE_PREFIXES):
            allowed.append(change)
        elif key == 'total_steps' and old is not _ABSENT and value is not _ABSENT and 0 < old <= value:
            allowed.append(f'{change} (the learning-rate schedule is stretched over the new total from the '
                           f'resumed step on)')
        elif key == 'total_steps' and old == 0:
            refused.append(f'{change} (the run\'s length came from num_epochs)')
        elif old is _ABSENT and key in default_flat and _same(default_flat[key], value):
            allowed.append(f'{change} (the default; the run predates this setting)')
        else:
            refused.append(change)
    if refused:
        lines = '\n'.join(f'  {line}' for line in refused)
        raise ResumeMismatchError(
            f'refusing to resume {workdir}: its config.json differs in {len(refused)} setting'
            f'{"s that change" if len(refused) > 1 else " that changes"} the result:\n{lines}\n'
            f'Rerun with the same settings, or train into a new --workdir.')
    return allowed


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _same(a, b) -> bool:
    """Equality where a tuple equals the list JSON made of it."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is _ABSENT or b is _ABSENT:
        return a is b
    return a == b


def _show(value) -> str:
    return 'absent' if value is _ABSENT else repr(value)
