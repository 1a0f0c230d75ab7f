"""A real data set, from its folder to a Dataset over cached tiles: list, prepare the cache once,
refuse or skip unreadable images, split, record the split and its members; or, for a run that
recorded them, exactly those members (`load_recorded`)."""
import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from allflax.data import cache, membership, sources, splits
from allflax.data.dataset import Dataset, default_cache_dir, Split, write_splits_json
from allflax.data.sources.listing import Listing


class UnreadableImagesError(ValueError):
    """Images that cannot be decoded, all listed at once so they can be fixed in one go."""


def _near_duplicates(hashes: np.ndarray, indices: dict[str, np.ndarray], paths: np.ndarray) -> list[dict]:
    """The audit for splits that cannot be patient-wise: near-identical images in different splits."""
    split_of = {int(i): name for name, split_indices in indices.items() for i in split_indices}
    pairs = splits.near_duplicate_pairs(hashes, indices)
    if pairs:
        logging.warning('%d near-duplicate image pairs across splits (perceptual hash within %d bits); '
                        'see near_duplicates in splits.json', len(pairs), splits.NEAR_DUPLICATE_MAX_DISTANCE)
    return [{'distance': distance,
             'images': [{'split': split_of[i], 'path': str(paths[i])} for i in (first, second)]}
            for first, second, distance in pairs]


def _near_duplicate_groups(hashes: np.ndarray, patients: np.ndarray,
                           method: str) -> tuple[np.ndarray | None, dict | None]:
    """The near-duplicate group of each image without a patient id (`splits.near_duplicate_groups`
    over all of them), which the split keeps together, and what was joined, for splits.json; (None,
    None) where every image has an id or the split is by image on purpose ('random')."""
    missing = np.flatnonzero(patients == '')
    if not len(missing) or method == 'random':
        return None, None
    labels, pairs = splits.near_duplicate_groups(np.asarray(hashes)[missing])
    sizes = np.bincount(labels)
    groups = np.full(len(patients), -1)
    groups[missing] = labels
    joined = {'max_distance': splits.NEAR_DUPLICATE_MAX_DISTANCE, 'images_without_patient_id': int(len(missing)),
              'pairs': pairs, 'groups_joined': int(np.sum(sizes > 1)), 'images_joined': int(sizes[sizes > 1].sum())}
    if joined['groups_joined']:
        logging.info('%d images without patient ids joined into %d near-duplicate groups (perceptual hash within '
                     '%d bits), each kept in one split', joined['images_joined'], joined['groups_joined'],
                     splits.NEAR_DUPLICATE_MAX_DISTANCE)
    return groups, joined


def load_real(config: ml_collections.ConfigDict, workdir: str | None = None) -> Dataset:
    """Lists `config.data.name` in data.dir, prepares (or reuses) its tile cache, splits it and
    writes `workdir/splits.json`. Split.images read the cache."""
    data = config.data
    listing = sources.list_records(data.name, data.dir, data.variant)
    prepared = cache.prepare(listing, image_size=data.image_size, steps=data.preprocess,
                             cache_root=default_cache_dir(config))
    if prepared.skipped and not data.skip_corrupt:
        raise UnreadableImagesError(
            f'{len(prepared.skipped)} unreadable image(s) in data.dir:\n  '
            + '\n  '.join(f'{os.path.join(listing.root, path)}: {reason}' for path, reason in prepared.skipped)
            + '\nReplace or remove them, or set data.skip_corrupt=True to leave them out '
              '(they are then listed under "skipped" in splits.json).')
    if prepared.skipped:
        logging.warning('Leaving out %d unreadable images (data.skip_corrupt=True)', len(prepared.skipped))
    skipped = {path for path, _ in prepared.skipped}
    # The cache holds the readable records in listing order: record i is at cache position i.
    records = [record for record in listing.records if record.path not in skipped]
    labels = np.array([record.label for record in records], np.int32)
    patients = np.array([record.patient for record in records], str)
    paths = np.array([os.path.join(listing.root, record.path) for record in records], str)
    official_test = np.array([record.official_test for record in records])
    groups, joined = _near_duplicate_groups(prepared.hashes, patients, data.split)
    indices = splits.make_splits(labels, patients, method=data.split, fractions=dict(data.split_fractions),
                                 seed=config.seed, fold=data.fold, num_folds=data.num_folds,
                                 official_test=official_test, image_groups=groups)
    summary = splits.describe(indices, labels, patients, listing.class_names)
    if joined is not None:
        summary['near_duplicate_groups'] = joined
    if not listing.has_patients or data.split == 'random':
        summary['near_duplicates'] = _near_duplicates(prepared.hashes, indices, paths)
    relative = [record.path for record in records]
    removed = splits.official_overlap(patients, official_test) if data.split == 'official' else np.zeros(0, int)
    if len(removed):
        summary['removed_overlap'] = {'patients': sorted(set(patients[removed].tolist())),
                                      'images': [membership.portable(relative[i]) for i in removed]}
    summary['class_names'] = list(listing.class_names)
    summary['members'] = membership.file_members(indices, relative, prepared.sha256, labels, patients,
                                                 listing.class_names,
                                                 left_out=[*skipped, *(relative[i] for i in removed)])
    if workdir is not None:
        write_splits_json(workdir, summary, sorted(os.path.join(listing.root, path) for path in skipped))
    return Dataset(
        splits={name: Split(cache.TileReader(prepared.directory, split_indices), labels[split_indices],
                            patients[split_indices], tuple(paths[split_indices].tolist()))
                for name, split_indices in indices.items()},
        class_names=listing.class_names)


def load_recorded(config: ml_collections.ConfigDict, recorded: dict, *, run: str, needed: Sequence[str],
                  action: str) -> Dataset:
    """The splits `needed` of run `run` with exactly the members its splits.json (`recorded`) lists,
    in their order and with the run's classes, read from today's data.dir. Refuses (SplitsChanged,
    one line, before a cache is built) where a member of a needed split is missing, changed,
    relabelled, given another patient or moved; files in no split are ignored."""
    data = config.data
    where = f'data.dir={data.dir}'
    listing = sources.list_records(data.name, data.dir, data.variant)
    current = [listing.class_names[record.label] for record in listing.records]
    matched = membership.match_files(recorded, [record.path for record in listing.records], current,
                                     [record.patient for record in listing.records], listing.class_names)
    run_classes = membership.class_names(recorded)
    # The members and left-out files alone, in the run's classes: the listing training cached, so its
    # cache is found again while they are unchanged, whatever was added.
    root, everything = listing.root, listing.records
    listing = Listing(listing.name, root, run_classes, tuple(
        dataclasses.replace(everything[i], label=run_classes.index(current[i]))
        for i in matched.kept if current[i] in run_classes))
    settings = dict(image_size=data.image_size, steps=data.preprocess, cache_root=default_cache_dir(config))
    found = cache.find(listing, **settings)
    digests = _digests(listing, found) if found else {
        membership.portable(everything[i].path): membership.file_digest(os.path.join(root, everything[i].path))
        for i in matched.kept}
    membership.check_contents(recorded, matched, digests.get,
                              lambda path: membership.file_digest(os.path.join(root, path)))
    membership.enforce(matched.differences, where=where, run=run, needed=needed, action=action)
    prepared = found or cache.prepare(listing, **settings)
    position = {membership.portable(record.path): i for i, record in enumerate(_readable(listing, prepared))}
    members = recorded['members']['splits']
    if not found:  # Read again by the build: a file changed meanwhile is refused all the same.
        built, changed = _digests(listing, prepared), membership.Differences()
        for name in needed:
            for member in members[name]:
                if built.get(member['path']) != member['sha256']:
                    changed.note(name, 'changed content' if member['path'] in built else 'unreadable now',
                                 member['path'])
        membership.enforce(changed, where=where, run=run, needed=needed, action=action)
    return Dataset(
        splits={name: Split(cache.TileReader(prepared.directory, [position[m['path']] for m in members[name]]),
                            np.array([run_classes.index(m['label']) for m in members[name]], np.int32),
                            np.array([m['patient'] for m in members[name]], str),
                            tuple(os.path.join(root, *m['path'].split('/')) for m in members[name]))
                for name in members if name in needed},
        class_names=run_classes)


def _readable(listing: Listing, prepared: cache.PreparedCache) -> list:
    """The listing's records that the cache holds, in cache order."""
    skipped = {path for path, _ in prepared.skipped}
    return [record for record in listing.records if record.path not in skipped]


def _digests(listing: Listing, prepared: cache.PreparedCache) -> dict[str, str]:
    """Path (as recorded) -> sha256 of each readable file, as the cache stored it."""
    return {membership.portable(record.path): digest
            for record, digest in zip(_readable(listing, prepared), prepared.sha256)}
