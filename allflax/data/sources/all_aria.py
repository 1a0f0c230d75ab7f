"""The Taleqani hospital ALL set (Aria et al.): peripheral-blood-smear images of 89 patients,
benign haematogones and three B-ALL subtypes, without patient ids.

Layout, found at data.dir or up to two levels below it:
  Original/{Benign,Early,Pre,Pro}/*.jpg and Segmented/{Benign,Early,Pre,Pro}/*.jpg  (data.variant)
Renamed copies are accepted too, e.g. Benign, [Malignant] early Pre-B, [Malignant] Pre-B,
[Malignant] Pro-B, with or without the Original/ level (which then means variant 'original').
"""
import os
import re

from allflax.data.sources.listing import (Listing, Record, check_every_class_present, class_folder_images,
                                          find_layout, subfolders)

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
