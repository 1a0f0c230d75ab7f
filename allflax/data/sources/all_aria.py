"""The Taleqani hospital ALL set (Aria et al.): peripheral-blood-smear images of 89 patients,
benign haematogones and three B-ALL subtypes, without patient ids.

Layout, found at data.dir or up to two levels below it:
  Original/{Benign,Early,Pre,Pro}/*.jpg and Segmented/{Benign,Early,Pre,Pro}/*.jpg  (data.variant)
Renamed copies are accepted too, e.g. Benign, [Malignant] early Pre-B, [Malignant] Pre-B,
[Malignant] Pro-B, with or without the Original/ level (which then means variant 'original').
"""
import os
import re

from allflax.data.sources.facts import Facts, UNCONFIRMED, UNKNOWN
from allflax.data.sources.listing import (Listing, Record, check_every_class_present, class_folder_images,
                                          find_layout, subfolders)

FACTS = Facts(
    title='Acute Lymphoblastic Leukemia (ALL) image dataset, Taleqani Hospital, Tehran (Aria et al.)',
    specimen=('peripheral blood smears, bone-marrow laboratory of Taleqani Hospital, Tehran, as the data set\'s '
              'curators publish it (paper 1, arXiv:2508.17216, says "bone marrow smear images")'),
    stain=f'{UNKNOWN} (not named)',
    acquisition='Zeiss camera on a microscope at 100× magnification, JPG',
    magnification='100×',
    microns_per_pixel=f'{UNKNOWN} (not published)',
    image_type=(f'multi-cell fields {UNCONFIRMED}; the curators also ship colour-threshold segmented copies '
                '(Segmented/, data.variant=\'segmented\')'),
    patients='89: 25 benign (hematogones), 64 ALL',
    images=f'3,256 (Benign 504, Early Pre-B 985, Pre-B 963, Pro-B 804 {UNCONFIRMED})',
    sites='Taleqani Hospital, Tehran',
    labels='types and subtypes set by a specialist using flow cytometry',
    source='doi:10.34740/KAGGLE/DSV/2175623 (Kaggle)',
    licence=('the authors\' terms: cite the paper; "do not distribute the database ... without the authorization '
             'from authors"'),
    citation=('Aria M, Ghaderzadeh M, Bashash D, Abolghasemi H, Asadi F, Hosseini A. Acute Lymphoblastic Leukemia '
              '(ALL) image dataset. Kaggle, 2021. doi:10.34740/KAGGLE/DSV/2175623',
              'Ghaderzadeh M et al. A fast and efficient CNN model for B-ALL diagnosis and its subtypes '
              'classification using peripheral blood smear images. Int J Intell Syst 2022;37:5113–5133. '
              'doi:10.1002/int.22753'),
    notes=('File names carry no patient id: no patient-wise split is possible, so cells of one patient may be in '
           'training and test.',
           'Paper 1 (arXiv:2508.17216) says "bone marrow smear images"; the set it appears to use is this '
           f'peripheral-blood one {UNCONFIRMED}.'),
    fact_sources=('github.com/MehradAria/ALL-Subtype-Classification',
                  'kaggle.com/datasets/mehradaria/leukemia (page text)'))

CLASS_NAMES = ('Benign', 'Early Pre-B', 'Pre-B', 'Pro-B')  # The order of synthetic_all4.
VARIANT_FOLDERS = {'original': 'Original', 'segmented': 'Segmented'}
# Class folder names, lower-cased, without "malignant" and non-alphanumerics → label.
_ALIASES = {'benign': 0, 'early': 1, 'earlypreb': 1, 'pre': 2, 'preb': 2, 'pro': 3, 'prob': 3}


def label_of_folder(name: str) -> int | None:
    """'[Malignant] early Pre-B' → 1; None for a folder that is no class of this set."""
    key = re.sub(r'[^a-z0-9]', '', name.lower().replace('malignant', ''))
    return _ALIASES.get(key)


def _class_root(folder: str, variant_folder: str) -> str | None:
    """The folder holding the class folders of this variant, when `folder` is or holds it."""
    if os.path.isdir(os.path.join(folder, variant_folder)):
        return os.path.join(folder, variant_folder)
    other_variants = {name.lower() for name in VARIANT_FOLDERS.values()} - {variant_folder.lower()}
    if os.path.basename(folder).lower() in other_variants:
        return None
    is_flat_copy = os.path.basename(folder) == variant_folder or variant_folder == VARIANT_FOLDERS['original']
    if is_flat_copy and any(label_of_folder(name) is not None for name in subfolders(folder)):
        return folder
    return None


def list_records(data_dir: str, variant: str) -> Listing:
    if variant not in VARIANT_FOLDERS:
        raise ValueError(f'data.variant={variant!r} is not a variant of all_aria; '
                         f'choose one of: {", ".join(VARIANT_FOLDERS)}')
    variant_folder = VARIANT_FOLDERS[variant]
    expected = (f'the ALL (Taleqani hospital) layout: {variant_folder}/<class>/*.jpg with class folders '
                f'Benign, Early, Pre, Pro (or e.g. "[Malignant] early Pre-B")')
    root = find_layout(data_dir, lambda folder: _class_root(folder, variant_folder), expected)
    records = tuple(Record(path, label, '') for path, label in class_folder_images(root, label_of_folder, CLASS_NAMES))
    check_every_class_present(records, CLASS_NAMES, root)
    return Listing('all_aria', root, CLASS_NAMES, records)
