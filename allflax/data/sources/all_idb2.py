"""ALL-IDB2 (Labati et al.): 260 cropped single-cell images, ALL_IDB2/img/ImXXX_Y.tif with Y = 1
for a blast, 0 for a normal cell. No patient ids.
"""
import os
import re

from allflax.data.sources.facts import Facts, UNCONFIRMED, UNKNOWN
from allflax.data.sources.listing import (Listing, LayoutError, Record, check_every_class_present, find_layout,
                                          image_files)

FACTS = Facts(
    title='ALL-IDB2, of ALL-IDB: the acute lymphoblastic leukemia image database (Donida Labati, Piuri, Scotti)',
    specimen='peripheral blood',
    stain=f'{UNKNOWN} (not stated)',
    acquisition='optical microscope with a Canon PowerShot G5; ALL-IDB1 fields as 24-bit JPG, 2592×1944',
    magnification='300–500',
    microns_per_pixel=f'{UNKNOWN} (not published)',
    image_type=f'single-cell crops cut from ALL-IDB1\'s fields, 257×257 TIFF {UNCONFIRMED}',
    patients=f'{UNKNOWN} (not published)',
    images=f'260: 130 blasts, 130 normal {UNCONFIRMED}',
    sites=UNKNOWN,
    labels=f'ALL-IDB1 was labelled by expert oncologists; ALL-IDB2 is cut from it {UNCONFIRMED}',
    source='homes.di.unimi.it/scotti/all; doi:10.1109/ICIP.2011.6115881',
    licence=f'access by application form; not redistributable {UNCONFIRMED}',
    citation=('Donida Labati R, Piuri V, Scotti F. ALL-IDB: the acute lymphoblastic leukemia image database for '
              'image processing. Proc. IEEE ICIP 2011, pp. 2045–2048. doi:10.1109/ICIP.2011.6115881',),
    notes=('No patient ids: no patient-wise split is possible.',
           'Never mix ALL-IDB1 and ALL-IDB2: ALL-IDB2 is cut from ALL-IDB1.'),
    fact_sources=('homes.di.unimi.it/scotti/all (the ALL-IDB site)', 'the ICIP 2011 paper',
                  'the ALL-IDB authors\' repositories'))

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
