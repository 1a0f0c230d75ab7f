"""A run's splits are part of the run: which images each split holds, recorded in splits.json when
the run is trained, and today's data matched against that record whenever the run is used again
(a resume, eval, export, compare), so that a changed data folder never silently gives another
test set.

A real set records each member's path (relative to the set's folder, with '/'), the sha256 of its
file, its class name and its patient; a synthetic set the indices into the generated set and the
settings that generate it. Files that are in no split are never used; a member that is missing,
changed, relabelled, given another patient or moved is refused where the caller needs its split.
"""
import collections
import dataclasses
import hashlib
import os
from collections.abc import Callable, Collection, Sequence

import numpy as np
from absl import logging

from allflax.data import splits as splits_lib

FORMAT = 1
_SHOWN = 3  # Files named per kind of change; the others are counted.


class SplitsChanged(ValueError):
    """The data no longer holds a run's split members, or two runs were tested on different members."""


def portable(path: str) -> str:
    """A path relative to the set's folder, as recorded: '/'-separated on every system."""
    return path.replace(os.sep, '/')


def split_names(recorded: dict) -> list[str]:
    """The splits a splits.json describes, in its order."""
    return [name for name, value in recorded.items() if isinstance(value, dict) and 'num_examples' in value]


def class_names(recorded: dict) -> tuple[str, ...]:
    """The run's classes in class order: recorded since members are; before, the order of the train
    split's class counts (written in class order)."""
    return tuple(recorded.get('class_names') or recorded['train']['class_counts'])


def file_members(indices: dict[str, np.ndarray], paths: Sequence[str], digests: Sequence[str],
                 labels: np.ndarray, patients: np.ndarray, names: Sequence[str], *, left_out: Collection[str] = ()
                 ) -> dict:
    """splits.json's `members` for a real set: per split, in split order, each image's path
    (relative to the set's folder), sha256, class name and patient; `left_out`: the set's files
    in no split on purpose (unreadable, or a patient of both sides of the official split)."""
    return {'format': FORMAT, 'kind': 'files', 'left_out': sorted(map(portable, left_out)),
            'splits': {name: [{'path': portable(paths[i]), 'sha256': digests[i], 'label': names[labels[i]],
                               'patient': str(patients[i])} for i in split_indices.tolist()]
                       for name, split_indices in indices.items()}}


def generated_members(indices: dict[str, np.ndarray], generated: dict) -> dict:
    """splits.json's `members` for a synthetic set: per split the indices into the set that
    `generated` (its name and generation settings) describes."""
    return {'format': FORMAT, 'kind': 'generated', 'generated': dict(generated),
            'splits': {name: split_indices.tolist() for name, split_indices in indices.items()}}


def _plural(count: int, word: str) -> str:
    return f'{count} {word}' + ('' if count == 1 else 's')


def _named(items: Sequence[str]) -> str:
    shown = ', '.join(items[:_SHOWN])
    return shown + (f' and {len(items) - _SHOWN} more' if len(items) > _SHOWN else '')


@dataclasses.dataclass
class Differences:
    """What differs between a run's recorded members and the data of today."""
    added: list[str] = dataclasses.field(default_factory=list)  # Files in no split: ignored.
    class_folders: str = ''  # How today's classes differ from the run's, where they do.
    # Split -> kind of change -> the files, described.
    by_split: dict[str, dict[str, list[str]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(list)))

    def note(self, split: str, kind: str, what: str):
        self.by_split[split][kind].append(what)

    def describe(self, names: Collection[str]) -> list[str]:
        """One phrase per kind of change of the splits `names`."""
        return [f'{_plural(len(items), f"{split} file")} {kind}: {_named(items)}'
                for split, kinds in self.by_split.items() if split in names for kind, items in kinds.items()]


def enforce(differences: Differences, *, where: str, run: str, needed: Collection[str], action: str):
    """Raises SplitsChanged, in one line, where a split in `needed` changed; else warns of changes to
    the splits that `action` does not use and says how many files it ignores."""
    refused = differences.describe(needed)
    if refused:
        parts = [*([f'{_plural(len(differences.added), "file")} added, not in the run\'s splits (ignored)']
                   if differences.added else []),
                 *([differences.class_folders] if differences.class_folders else []), *refused]
        raise SplitsChanged(f'{where} differs from run {run}\'s splits: {"; ".join(parts)}; refusing to {action}: '
                            f'use the data the run was trained on, or train a new run on today\'s data')
    unused = differences.describe(set(differences.by_split) - set(needed))
    if unused:
        logging.warning('%s differs from run %s\'s splits that %s does not use: %s', where, run, action,
                        '; '.join(unused))
    if differences.added or differences.class_folders:
        logging.warning('%s: %s in none of run %s\'s splits: ignored%s', where,
                        _plural(len(differences.added), 'file'), run,
                        f' ({differences.class_folders})' if differences.class_folders else '')


@dataclasses.dataclass(frozen=True)
class Matched:
    """Today's listing matched against a run's members by path."""
    position: dict[str, list[int | None]]  # Split -> each member's index in the listing's records, or None.
    kept: list[int]  # Records at the paths of members or left-out files, in listing order.
    differences: Differences


def match_files(recorded: dict, paths: Sequence[str], labels: Sequence[str], patients: Sequence[str],
                current_classes: Sequence[str]) -> Matched:
    """Matches the members of splits.json `recorded` with today's files by path: `paths` (relative
    to the set's folder), their class names and patients. Notes members missing, relabelled or with
    another patient, the files added (in no split), and how the classes differ; contents are
    compared by `check_contents`."""
    members = recorded['members']
    run_classes = class_names(recorded)
    index_of = {portable(path): i for i, path in enumerate(paths)}
    differences = Differences()
    kept = {index_of[path] for path in members.get('left_out', ()) if path in index_of}
    position = {}
    for split, split_members in members['splits'].items():
        position[split] = []
        for member in split_members:
            i = index_of.get(member['path'])
            position[split].append(i)
            if i is None:
                differences.note(split, 'missing', member['path'])
                continue
            kept.add(i)
            if labels[i] != member['label']:
                differences.note(split, 'relabelled', f'{member["path"]} ({member["label"]} -> {labels[i]})')
            elif patients[i] != member['patient']:
                differences.note(split, 'with another patient',
                                 f'{member["path"]} ({member["patient"] or "none"} -> {patients[i] or "none"})')
    differences.added = [portable(paths[i]) for i in range(len(paths)) if i not in kept]
    if tuple(current_classes) != run_classes:
        new, gone = sorted(set(current_classes) - set(run_classes)), sorted(set(run_classes) - set(current_classes))
        differences.class_folders = ('classes differ: ' + '; '.join(
            [*([f'{", ".join(new)} not the run\'s'] if new else []), *([f'{", ".join(gone)} gone'] if gone else []),
             *([f'the run\'s order is {", ".join(run_classes)}'] if not new and not gone else [])]))
    return Matched(position, sorted(kept), differences)


def check_contents(recorded: dict, matched: Matched, digest_of: Callable[[str], str | None],
                   added_digest_of: Callable[[str], str | None]):
    """Notes in `matched.differences` the members whose file changed (`digest_of(path)`: today's
    sha256, None where unreadable) and, of the missing ones, those found under a new path among the
    added files (`added_digest_of`, asked only when some are missing): renamed, not added."""
    members = recorded['members']['splits']
    differences = matched.differences
    missing = {member['sha256']: (split, member['path']) for split, split_members in members.items()
               for member, i in zip(split_members, matched.position[split]) if i is None}
    for split, split_members in members.items():
        for member, i in zip(split_members, matched.position[split]):
            if i is None:
                continue
            digest = digest_of(member['path'])
            if digest is None:
                differences.note(split, 'unreadable now', member['path'])
            elif digest != member['sha256']:
                differences.note(split, 'changed content', member['path'])
    if not missing:
        return
    still_added = []
    for path in differences.added:
        found = missing.pop(added_digest_of(path), None)
        if found is None:
            still_added.append(path)
            continue
        split, old = found
        kinds = differences.by_split[split]
        kinds['missing'].remove(old)
        if not kinds['missing']:
            del kinds['missing']
        differences.note(split, 'renamed', f'{old} -> {path}')
    differences.added = still_added


def file_digest(path: str) -> str | None:
    """The sha256 of a file's bytes; None where it cannot be read."""
    try:
        with open(path, 'rb') as f:
            return hashlib.file_digest(f, 'sha256').hexdigest()
    except OSError:
        return None


def check_generated(recorded: dict, generated: dict, *, run: str, action: str):
    """Refuses settings that generate another synthetic set than the run's (`members.generated`)."""
    was = recorded['members']['generated']
    changed = [f'{key} {generated.get(key)!r} (the run\'s {was.get(key)!r})'
               for key in sorted(was.keys() | generated.keys()) if was.get(key) != generated.get(key)]
    if changed:
        raise SplitsChanged(f'the synthetic set these settings generate differs from run {run}\'s: '
                            f'{", ".join(changed)}; refusing to {action}: use the run\'s config.json (leave out '
                            f'--config) or train a new run')


def check_unrecorded(recorded: dict, summary: dict, current_classes: Sequence[str], *, where: str, run: str,
                     needed: Collection[str], action: str):
    """For a run whose splits.json predates recorded members: refuses a split recomputed from today's
    data whose patients or class counts differ from those recorded (or other classes); else warns
    that the members were not recorded, so a changed file of a patient goes unseen."""
    run_classes = class_names(recorded)
    problems = []
    if tuple(current_classes) != run_classes:
        problems.append(f'classes {", ".join(current_classes)}, the run\'s {", ".join(run_classes)}')
    for name in needed:
        was, now = recorded.get(name, {}), summary.get(name, {})
        if was.get('patients') != now.get('patients'):
            gained = sorted(set(now.get('patients', ())) - set(was.get('patients', ())))
            lost = sorted(set(was.get('patients', ())) - set(now.get('patients', ())))
            problems.append(f'{name} patients differ ({_plural(len(gained), "new one")}: {_named(gained) or "-"}; '
                            f'{len(lost)} gone: {_named(lost) or "-"})')
        if was.get('class_counts') != now.get('class_counts') or was.get('num_examples') != now.get('num_examples'):
            problems.append(f'{name} class counts {now.get("class_counts")}, the run\'s {was.get("class_counts")}')
    if problems:
        raise SplitsChanged(f'run {run}\'s splits.json records no members (written before allflax recorded them) and '
                            f'the splits recomputed from {where} differ from it: {"; ".join(problems)}; refusing to '
                            f'{action}: use the data the run was trained on, or train a new run on today\'s data')
    logging.warning('run %s\'s splits.json records no members (written before allflax recorded them): its splits were '
                    'recomputed from %s and match its patients and class counts; a changed image cannot be detected',
                    run, where)


def summary_of(dataset_splits: dict, names: Sequence[str]) -> dict:
    """`splits.describe` of a Dataset's splits: what splits.json records of each."""
    summary = {}
    for name, split in dataset_splits.items():
        summary.update(splits_lib.describe({name: np.arange(len(split))}, split.labels, split.patients, names))
    return summary


def differing_members(first: dict, second: dict, split: str) -> int | None:
    """How many members of `split` are in one run's splits.json and not the other's (counted with
    multiplicity, order aside); None where either records no members."""
    identities = []
    for recorded in (first, second):
        members = recorded.get('members')
        if not members or split not in members['splits']:
            return None
        if members['kind'] == 'generated':
            origin = tuple(sorted(members['generated'].items()))
            identities.append(collections.Counter((origin, index) for index in members['splits'][split]))
        else:
            identities.append(collections.Counter((m['path'], m['sha256'], m['label'])
                                                  for m in members['splits'][split]))
    return sum((identities[0] - identities[1]).values()) + sum((identities[1] - identities[0]).values())
