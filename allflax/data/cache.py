"""Preprocessed uint8 tiles of a real data set, written once through a TFDS builder into
ArrayRecord files and read back by random access, without TensorFlow.

A cache is keyed by all that shapes it: source, image size, preprocessing steps and every file
with its label, patient, size and modification time, so a change rebuilds and an unchanged rerun
reuses it. TFDS writes into an `incomplete.*` folder and renames it only when the build has
finished, so an interrupted build is never taken as complete: the next run builds again.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from allflax.data import preprocess
from allflax.data.sources.listing import Listing

# Bump when the tiles for the same inputs, or the metadata stored with them, change, so old caches
# are not reused (2: each file's sha256, which a run records for its splits).
FORMAT_VERSION = 2
_SPLIT = 'tiles'  # The one TFDS split: all tiles, in listing order; train/val/test are chosen on top.
_CHUNK = 64  # Images preprocessed concurrently: bounds memory while threads share the work.


@dataclasses.dataclass(frozen=True)
class PreparedCache:
    directory: str  # The TFDS dataset folder (…/allflax_tiles/1.0.0).
    skipped: tuple[tuple[str, str], ...]  # (path relative to the source root, why), unreadable images.
    hashes: np.ndarray  # uint64 perceptual hash of each cached image, for the near-duplicate audit.
    sha256: tuple[str, ...]  # Of each cached image's file bytes: what a run records of its members.


class TileReader:
    """`reader[i]`: the uint8 tile at cache position positions[i]. Opens the ArrayRecord files on
    first use and pickles without them, so Grain worker processes each open their own."""

    def __init__(self, directory: str, positions: np.ndarray):
        self.directory = directory
        self.positions = np.asarray(positions, np.int64)
        self._source = None

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index) -> np.ndarray:
        if self._source is None:
            self._source = tfds.builder_from_directory(self.directory).as_data_source(_SPLIT)
        return self._source[int(self.positions[index])]['image']

    def __getstate__(self):
        return {**self.__dict__, '_source': None}


class AllflaxTiles(tfds.core.GeneratorBasedBuilder):
    """One real data set's tiles with label, patient and original path, in listing order.
    Unreadable images are left out and named, with the reason, in the metadata (`skipped`)."""

    VERSION = tfds.core.Version('1.0.0')
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Download the data set yourself and set data.dir to its folder.'
    # TFDS looks for download checksums beside a builder's module, which for a module in a package
    # needs importlib_resources, a dependency TFDS 4.9.10 does not declare (tensorflow/datasets#11212).
    # This builder downloads nothing, so it has no checksums to find.
    code_path = None

    def __init__(self, *, listing: Listing, image_size: int, steps: tuple[str, ...], **kwargs):
        self._listing = listing
        self._image_size = image_size
        self._steps = steps
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self._image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f'{self._listing.name} tiles, {size} px, preprocessed by {", ".join(self._steps)}',
            features=tfds.features.FeaturesDict({
                # Raw bytes: TFDS would store a plain uint8 tensor as one int64 per value.
                'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                'label': tfds.features.ClassLabel(names=self._listing.class_names),
                'patient': tfds.features.Text(),
                'path': tfds.features.Text(),
            }),
            disable_shuffling=True,  # Keep listing order: position i is the i-th readable record.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        return {_SPLIT: self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _tile(self, path: str) -> tuple[np.ndarray, int, str] | preprocess.UnreadableImageError:
        """The tile, the source image's perceptual hash and its file's sha256, or the error, which is
        collected, not raised."""
        try:
            data = preprocess.read_bytes(path)
            image = preprocess.decode_image(data, path)
        except preprocess.UnreadableImageError as error:
            return error
        return (preprocess.preprocess(image, self._steps, self._image_size), preprocess.perceptual_hash(image),
                hashlib.sha256(data).hexdigest())

    def _generate_examples(self, root: str):
        records = self._listing.records
        skipped, hashes, digests = [], [], []
        with concurrent.futures.ThreadPoolExecutor() as pool:  # OpenCV releases the GIL.
            for start in range(0, len(records), _CHUNK):
                chunk = records[start:start + _CHUNK]
                results = pool.map(self._tile, [os.path.join(root, record.path) for record in chunk])
                for index, (record, result) in enumerate(zip(chunk, results), start):
                    if isinstance(result, preprocess.UnreadableImageError):
                        skipped.append((record.path, result.reason))
                        continue
                    tile, image_hash, digest = result
                    hashes.append(image_hash)
                    digests.append(digest)
                    yield index, {'image': tile, 'label': record.label, 'patient': record.patient,
                                  'path': record.path}
        # Written with dataset_info.json once all examples are: part of the same atomic rename.
        self.info.metadata.update(skipped=skipped, hashes=hashes, sha256=digests)


def cache_key(listing: Listing, image_size: int, steps: tuple[str, ...]) -> str:
    files = []
    for record in listing.records:
        stat = os.stat(os.path.join(listing.root, record.path))
        files.append((record.path, record.label, record.patient, stat.st_size, stat.st_mtime_ns))
    description = dict(format=FORMAT_VERSION, source=listing.name, class_names=listing.class_names,
                       image_size=image_size, steps=steps, files=files)
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]


def _builder(listing: Listing, image_size: int, steps, cache_root: str) -> AllflaxTiles:
    steps = preprocess.check_steps(steps)
    data_dir = os.path.join(cache_root, 'tiles', f'{listing.name}-{cache_key(listing, image_size, steps)}')
    return AllflaxTiles(listing=listing, image_size=image_size, steps=steps, data_dir=data_dir)


def _prepared(builder: AllflaxTiles) -> PreparedCache:
    metadata = builder.info.metadata
    return PreparedCache(os.fspath(builder.data_dir), tuple(map(tuple, metadata['skipped'])),
                         np.array(metadata['hashes'], np.uint64), tuple(metadata['sha256']))


def find(listing: Listing, *, image_size: int, steps, cache_root: str) -> PreparedCache | None:
    """The complete cache for these records and settings, or None where there is none (nothing is built)."""
    builder = _builder(listing, image_size, steps, cache_root)
    return _prepared(builder) if builder.is_prepared() else None


def prepare(listing: Listing, *, image_size: int, steps, cache_root: str) -> PreparedCache:
    """Builds the cache for these records and settings unless a complete one exists; returns it."""
    builder = _builder(listing, image_size, steps, cache_root)
    if builder.is_prepared():
        logging.info('Reusing the %s cache in %s', listing.name, builder.data_dir)
    else:
        logging.info('Preparing %d %s images into %s', len(listing.records), listing.name, builder.data_dir)
        builder.download_and_prepare(file_format='array_record',
                                     download_config=tfds.download.DownloadConfig(manual_dir=listing.root))
    return _prepared(builder)
