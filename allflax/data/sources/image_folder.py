"""Any other set as root/<class>/<image>: class names are the sorted folder names. An optional
root/patients.csv (columns path,patient; path relative to root) gives patient ids, so splits can
keep each patient whole. What the images are and where they came from is the user's to state, in
the config's `data.facts` (`facts.from_config`); what is not stated is shown as unknown.
"""
import csv
import os

from allflax.data.sources.listing import (Listing, LayoutError, Record, class_folder_images, find_layout,
                                          subfolders)

PATIENTS_CSV = 'patients.csv'


def _read_patients(csv_path: str) -> dict[str, str]:
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f)
        if not {'path', 'patient'} <= set(reader.fieldnames or ()):
            raise LayoutError(f'{csv_path!r} needs the columns path,patient; it has {reader.fieldnames}')
        return {os.path.normpath(row['path']): row['patient'].strip() for row in reader}


def list_records(data_dir: str) -> Listing:
    root = find_layout(data_dir, lambda folder: folder if subfolders(folder) else None,
                       'class folders: <data.dir>/<class>/<image>')
    class_names = tuple(subfolders(root))
    images = class_folder_images(root, class_names.index, class_names)
    csv_path = os.path.join(root, PATIENTS_CSV)
    if os.path.isfile(csv_path):
        patient_of = _read_patients(csv_path)
        missing = [path for path, _ in images if not patient_of.get(path)]
        if missing:
            raise LayoutError(f'{csv_path!r} gives no patient for {len(missing)} image(s): add rows for '
                              f'{", ".join(missing)}')
    else:
        patient_of = {}
    records = tuple(Record(path, label, patient_of.get(path, '')) for path, label in images)
    return Listing('image_folder', root, class_names, records)
