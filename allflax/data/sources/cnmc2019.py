"""C-NMC 2019 (ISBI challenge): single segmented leukocytes, 450×450 BMP on black, ALL blast
("all") vs normal ("hem"), with the patient in each file name.

Two layouts, found at data.dir or up to two levels below it:
  Kaggle      C-NMC_Leukemia/training_data/fold_{0,1,2}/{all,hem}/UID_*.bmp
              C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data/<n>.bmp
              C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv
              C-NMC_Leukemia/testing_data/C-NMC_test_final_phase_data/<n>.bmp  (unlabelled)
  challenge   fold_{0,1,2}/{all,hem}/UID_*.bmp, phase2/<n>.bmp, phase2.csv (beside or in phase2/)
The labels CSVs map each renamed test image back to its original name, which holds the patient:
columns Patient_ID (original name), new_names (file in the folder), labels (1 = all, 0 = hem).
"""
import csv
import os
import re

from absl import logging

from allflax.data.sources.facts import Facts, UNCONFIRMED, UNKNOWN
from allflax.data.sources.listing import (Listing, LayoutError, Record, check_every_class_present,
                                          class_folder_images, find_layout, image_files, subfolders)

FACTS = Facts(
    title=('C-NMC 2019: ISBI 2019 challenge "Classification of Normal vs Malignant Cells in B-ALL White Blood '
           'Cancer Microscopic Images" (ALL Challenge dataset of ISBI 2019)'),
    specimen=f'blood smears; peripheral blood or bone marrow is not stated {UNCONFIRMED}',
    stain=f'{UNKNOWN}: not stated for C-NMC (Jenner-Giemsa is stated for sibling SBILab sets) {UNCONFIRMED}',
    acquisition=(f'source fields of 2560×1920 pixels; cells segmented after the organisers\' stain normalisation '
                 f'{UNCONFIRMED}; microscope and camera {UNKNOWN}'),
    magnification=UNKNOWN,
    microns_per_pixel=f'{UNKNOWN} (not published)',
    image_type=f'single segmented cells on black, 450×450 BMP {UNCONFIRMED}',
    patients='118 subjects',
    images=('15,135 (15,114 by the organisers\' paper and the file counts): training folds 0–2 10,661 (all 7,272, '
            'hem 3,389); preliminary test 1,867, labelled (all 1,219, hem 648); final test 2,586, unlabelled'),
    sites='SBILab, IIIT-Delhi with the Laboratory Oncology Unit, AIIMS New Delhi (the organisers)',
    labels='ground truth marked by an expert oncologist',
    source='doi:10.7937/tcia.2019.dc64i46r (The Cancer Imaging Archive)',
    licence=(f'{UNKNOWN} for C-NMC itself {UNCONFIRMED}; TCIA collections are mostly CC BY 3.0, with citation '
             'required'),
    citation=('Gupta A, Gupta R. ALL Challenge dataset of ISBI 2019 [Data set]. The Cancer Imaging Archive, 2019. '
              'doi:10.7937/tcia.2019.dc64i46r',
              'Gehlot S, Gupta A, Gupta R. SDCT-AuxNet-θ. Med Image Anal 2020;61:101661. '
              'doi:10.1016/j.media.2020.101661',
              'Clark K et al. The Cancer Imaging Archive (TCIA). J Digit Imaging 2013;26(6):1045–57. '
              'doi:10.1007/s10278-013-9622-7'),
    notes=('Paper 2 (arXiv:2601.01026) used "12,528 original images from 62 patients": 12,528 = the training '
           f'folds (10,661) + the labelled preliminary test (1,867); its 62 patients could not be reconciled '
           f'{UNCONFIRMED}.',),
    fact_sources=('competitions.codalab.org/competitions/20429', 'arXiv:2006.00304 (the organisers\' paper)',
                  'kaggle.com/datasets/andrewmvd/leukemia-classification (page text)',
                  'github.com/jprellberg/isbi2019cancer', 'the TCIA data usage policy'))

CLASS_NAMES = ('hem', 'all')  # Label 0, 1: the order of synthetic.CLASS_NAMES['synthetic_cnmc'].
_LABEL_OF_FOLDER = {name: label for label, name in enumerate(CLASS_NAMES)}
_FILE_NAME = re.compile(r'UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp', re.IGNORECASE)
_FILE_PATTERN = 'UID_<patient>_<image>_<cell>_<all|hem>.bmp'
_FOLD = re.compile(r'fold_\d+')
_EXPECTED = ('the C-NMC 2019 layout: C-NMC_Leukemia/training_data/fold_0/{all,hem}/UID_*.bmp (Kaggle) '
             'or fold_0/{all,hem}/UID_*.bmp (challenge)')
# Labelled test sets: (image folder, places its labels CSV may be), relative to the layout root.
_LABELLED_TEST_SETS = (
    ('validation_data/C-NMC_test_prelim_phase_data',
     ('validation_data/C-NMC_test_prelim_phase_data_labels.csv',)),
    ('phase2', ('phase2.csv', 'phase2/phase2.csv')),
)
_UNLABELLED_TEST_SET = 'testing_data/C-NMC_test_final_phase_data'
_CSV_COLUMNS = ('Patient_ID', 'new_names', 'labels')


def parse_file_name(name: str) -> tuple[str, int]:
    """(patient, label) from an original file name; healthy subjects' ids start with H:
    UID_H49_35_1_hem.bmp → ('H49', 0), UID_57_29_1_all.bmp → ('57', 1)."""
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        raise LayoutError(f'C-NMC file name {name!r} is not {_FILE_PATTERN}')
    return match[1].upper(), CLASS_NAMES.index(match[4].lower())


def _fold_folders(folder: str) -> list[str]:
    return [name for name in subfolders(folder) if _FOLD.fullmatch(name)] if os.path.isdir(folder) else []


def _training_folder(root: str) -> str | None:
    """Where the fold_* folders are: root/training_data (Kaggle) or root (challenge)."""
    for folder in (os.path.join(root, 'training_data'), root):
        if _fold_folders(folder):
            return folder
    return None


def _raise_if_any(problems: list[str], message: str) -> None:
    if problems:
        raise LayoutError(f'{message} ({len(problems)}):\n  ' + '\n  '.join(problems))


def _training_records(root: str, training_folder: str) -> list[Record]:
    records, mismatched, unparsable = [], [], []
    for fold in _fold_folders(training_folder):
        fold_folder = os.path.join(training_folder, fold)
        for path, label in class_folder_images(fold_folder, _LABEL_OF_FOLDER.get, CLASS_NAMES):
            full_path = os.path.join(fold_folder, path)
            try:
                patient, name_label = parse_file_name(os.path.basename(path))
            except LayoutError:
                unparsable.append(full_path)
                continue
            if name_label != label:
                mismatched.append(full_path)
            records.append(Record(os.path.relpath(full_path, root), label, patient))
    _raise_if_any(unparsable, f'C-NMC file names that are not {_FILE_PATTERN}; rename or remove them')
    _raise_if_any(mismatched, 'C-NMC images whose name says all/hem but whose folder says the other; '
                              'move them to the right folder')
    return records


def _read_labels_csv(csv_path: str) -> list[dict[str, str]]:
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f)
        columns = [name.strip() for name in reader.fieldnames or ()]
        missing = [name for name in _CSV_COLUMNS if name not in columns]
        if missing:
            raise LayoutError(f'labels CSV {csv_path!r} lacks column(s) {", ".join(missing)}; '
                              f'expected columns {",".join(_CSV_COLUMNS)}')
        return [{key.strip(): value.strip() for key, value in row.items()} for row in reader]


def _labelled_test_records(root: str, image_folder: str, csv_path: str) -> list[Record]:
    """The test images named in the CSV, each with its label and its original name's patient."""
    records, problems = [], []
    for line, row in enumerate(_read_labels_csv(csv_path), start=2):
        where = f'{csv_path}:{line}'
        image = os.path.join(image_folder, row['new_names'])
        if not os.path.isfile(image):
            problems.append(f'{where}: {image} does not exist')
            continue
        if row['labels'] not in ('0', '1'):
            problems.append(f'{where}: labels={row["labels"]!r}, expected 1 (all) or 0 (hem)')
            continue
        try:
            patient, name_label = parse_file_name(row['Patient_ID'])
        except LayoutError as error:
            problems.append(f'{where}: Patient_ID {error}')
            continue
        if name_label != int(row['labels']):
            problems.append(f'{where}: labels={row["labels"]} disagrees with Patient_ID={row["Patient_ID"]!r}')
            continue
        records.append(Record(os.path.relpath(image, root), name_label, patient, official_test=True))
    _raise_if_any(problems, f'bad rows in the labels CSV {csv_path}; fix them')
    unlisted = len(image_files(image_folder)) - len(records)
    if unlisted:
        logging.warning('%d images in %s are not in %s and are left out', unlisted, image_folder, csv_path)
    return records


def _test_records(root: str) -> list[Record]:
    for folder, csv_candidates in _LABELLED_TEST_SETS:
        image_folder = os.path.join(root, folder)
        if not os.path.isdir(image_folder):
            continue
        csv_paths = [os.path.join(root, name) for name in csv_candidates if os.path.isfile(os.path.join(root, name))]
        if not csv_paths:
            raise LayoutError(f'the labels CSV of the C-NMC test set {image_folder!r} is missing: expected '
                              f'{" or ".join(os.path.join(root, name) for name in csv_candidates)}')
        return _labelled_test_records(root, image_folder, csv_paths[0])
    return []


def list_records(data_dir: str) -> Listing:
    """The training folds and the labelled test set (official_test) of C-NMC 2019; the final-phase
    test images, which have no public labels, as unlabelled."""
    root = find_layout(data_dir, lambda folder: folder if _training_folder(folder) else None, _EXPECTED)
    records = _training_records(root, _training_folder(root)) + _test_records(root)
    check_every_class_present(records, CLASS_NAMES, root)
    unlabelled_folder = os.path.join(root, _UNLABELLED_TEST_SET)
    unlabeled = (tuple(os.path.join(_UNLABELLED_TEST_SET, name) for name in image_files(unlabelled_folder))
                 if os.path.isdir(unlabelled_folder) else ())
    return Listing('cnmc2019', root, CLASS_NAMES, tuple(records), unlabeled)
