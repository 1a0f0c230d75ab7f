"""ALL-IDB2 (Labati et al.): 260 cropped single-cell images, ALL_IDB2/img/ImXXX_Y.tif with Y = 1
for a blast, 0 for a normal cell. No patient ids.
"""
import os
import re

from allflax.data.sources.listing import (Listing, LayoutError, Record, check_every_class_present, find_layout,
                                          image_files)

CLASS_NAMES = ('normal', 'blast')
_FILE_NAME = re.compile(r'Im\d+_([01])\.\w+', re.IGNORECASE)
_EXPECTED = 'the ALL-IDB2 layout: ALL_IDB2/img/ImXXX_Y.tif (Y = 1 blast, 0 normal)'


def _locate(folder: str) -> str | None:
    image_folder = os.path.join(folder, 'img')
    if os.path.isdir(image_folder) and any(_FILE_NAME.fullmatch(name) for name in image_files(image_folder)):
        return folder
    return None


def list_records(data_dir: str) -> Listing:
    root = find_layout(data_dir, _locate, _EXPECTED)
    names = image_files(os.path.join(root, 'img'))
    unparsable = [name for name in names if not _FILE_NAME.fullmatch(name)]
    if unparsable:
        raise LayoutError(f'files in {os.path.join(root, "img")!r} not named ImXXX_Y.tif (Y = 0 or 1): '
                          f'{", ".join(unparsable)}; rename or remove them')
    records = tuple(Record(os.path.join('img', name), int(_FILE_NAME.fullmatch(name)[1]), '') for name in names)
    check_every_class_present(records, CLASS_NAMES, root)
    return Listing('all_idb2', root, CLASS_NAMES, records)
