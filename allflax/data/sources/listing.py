"""What a real source hands on: its records, found in the on-disk layout, and the errors
that say what was expected where when the layout is not there."""
import dataclasses
import os
from collections.abc import Callable, Sequence

from allflax.data.image_files import IMAGE_EXTENSIONS

# How far below data.dir a layout's folder may be: data.dir may be its parent or grandparent.
SEARCH_DEPTH = 2


class LayoutError(ValueError):
    """data.dir is missing, empty, or not the named layout."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: str  # Relative to Listing.root.
    label: int
    patient: str  # '' where the source has no patient ids.
    official_test: bool = False  # In the source's own labelled test set (C-NMC).


@dataclasses.dataclass(frozen=True)
class Listing:
    """A source's labelled records, plus unlabelled images kept for prediction."""
    name: str
    root: str
    class_names: tuple[str, ...]
    records: tuple[Record, ...]
    unlabeled: tuple[str, ...] = ()  # Relative to root.

    @property
    def has_patients(self) -> bool:
        return all(record.patient for record in self.records)


def subfolders(folder: str) -> list[str]:
    """Sorted names of the visible folders in `folder`."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))


def image_files(folder: str) -> list[str]:
    """Sorted names of the image files directly in `folder`."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith('.')
                  and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)


def find_layout(data_dir: str, locate: Callable[[str], str | None], expected: str) -> str:
    """The folder `locate` recognises, searched breadth-first from data.dir down SEARCH_DEPTH levels.

    `locate(folder)` returns the layout's root when `folder` is (or holds) it, else None;
    `expected` describes the layout for the error message.
    """
    if not data_dir:
        raise LayoutError(f'data.dir is not set: pass --config.data.dir=<folder holding {expected}>')
    if not os.path.isdir(data_dir):
        raise LayoutError(f'data.dir={data_dir!r} is not a folder: point it at the folder holding {expected}')
    if not os.listdir(data_dir):
        raise LayoutError(f'data.dir={data_dir!r} is empty: expected {expected}')
    level = [data_dir]
    for _ in range(SEARCH_DEPTH + 1):
        for folder in level:
            root = locate(folder)
            if root is not None:
                return root
        level = [os.path.join(folder, name) for folder in level for name in subfolders(folder)]
    raise LayoutError(f'data.dir={data_dir!r} does not hold {expected} (searched it and {SEARCH_DEPTH} '
                      f'levels below); found: {", ".join(sorted(os.listdir(data_dir))[:10])}')


def class_folder_images(parent: str, label_of: Callable[[str], int | None],
                        class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(folder/file, label) for each image in the class folders under `parent`.

    Raises on a folder `label_of` does not know and on a class folder without images,
    naming the folder, so a misplaced or half-copied download stops the run early.
    """
    images = []
    for folder in subfolders(parent):
        label = label_of(folder)
        if label is None:
            raise LayoutError(f'unknown class folder {os.path.join(parent, folder)!r}; known classes: '
                              f'{", ".join(class_names)}. Move or remove it.')
        files = image_files(os.path.join(parent, folder))
        if not files:
            raise LayoutError(f'class folder {os.path.join(parent, folder)!r} has no images '
                              f'({", ".join(IMAGE_EXTENSIONS)}): add them or remove the folder')
        images.extend((os.path.join(folder, name), label) for name in files)
    return images


def check_every_class_present(records: Sequence[Record], class_names: Sequence[str], root: str) -> None:
    """A class without any image cannot be learnt or scored: stop and say which."""
    present = {record.label for record in records}
    missing = [name for label, name in enumerate(class_names) if label not in present]
    if missing:
        raise LayoutError(f'no images of class {", ".join(missing)} under {root!r}')
