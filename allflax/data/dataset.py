"""What every data source hands the input pipeline: patient-wise splits of uint8 tiles."""
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from allflax import files


@dataclasses.dataclass(frozen=True)
class Split:
    """One split. `images[i]` is a uint8 H×W×3 RGB tile: an in-memory array for the synthetic
    sets, a random-access reader over the prepared cache for real ones (picklable, so
    Grain worker processes can read it)."""
    images: Sequence
    labels: np.ndarray  # int32
    patients: np.ndarray  # str; '' where the source has no patient ids
    paths: tuple[str, ...] = ()  # Original file of each image, where there is one.

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    splits: dict[str, Split]
    class_names: tuple[str, ...]


def default_cache_dir(config) -> str:
    """Where prepared tiles and generated sets are kept: data.cache_dir, else ~/.cache/allflax."""
    return config.data.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'allflax')


def write_splits_json(workdir: str, summary: dict, skipped: Sequence[str] = ()) -> str:
    """Writes `workdir/splits.json`: per split its size, patients and class counts, the files
    skipped as unreadable, and what `summary` adds (the class names, each split's members)."""
    return files.write_json(os.path.join(workdir, 'splits.json'), {**summary, 'skipped': list(skipped)})


def read_splits_json(workdir: str) -> dict | None:
    """The splits.json a run wrote into `workdir`, or None where it has none."""
    path = os.path.join(workdir, 'splits.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
