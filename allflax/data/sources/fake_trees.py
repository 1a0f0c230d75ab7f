"""Tiny folders in the exact on-disk layouts of the real data sets, file names as the real sets
name them, filled with generated cells (never shipped data). Each builder returns the layout's
folder, the one a user would pass as data.dir."""
import csv
import os

import cv2
import numpy as np

from allflax.data.sources import synthetic


def generated_cells(dataset: str, count_per_class: int, size: int, seed: int) -> list[np.ndarray]:
    """count_per_class distinct RGB cells of each class of a synthetic set (size >= 32)."""
    num_classes = len(synthetic.CLASS_NAMES[dataset])
    generated = synthetic.generate(dataset, num_images=count_per_class * num_classes, image_size=size,
                                   num_patients=2 * num_classes, seed=seed)
    return [generated.images[generated.labels == label] for label in range(num_classes)]


def write_image(path: str, rgb: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')
    return path


def _write_csv(path: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_cnmc_tree(root: str, patients_per_class: int = 3, images_per_patient: int = 4, size: int = 48,
                   test_patients_per_class: int = 1, num_unlabeled: int = 2, layout: str = 'kaggle',
                   seed: int = 0) -> str:
    """C-NMC 2019. Training patients go round-robin to fold_0..2; ALL patients are 1, 2, ...,
    healthy ones H1, H2, ...; the labelled test set's images are renamed 1.bmp, 2.bmp, ... with a
    labels CSV. layout='kaggle' (C-NMC_Leukemia/...) or 'challenge' (fold_*, phase2/, phase2.csv)."""
    if layout not in ('kaggle', 'challenge'):
        raise ValueError(f'layout={layout!r}: kaggle or challenge')
    top = os.path.join(root, 'C-NMC_Leukemia' if layout == 'kaggle' else 'C-NMC_2019')
    training = os.path.join(top, 'training_data') if layout == 'kaggle' else top
    test_folder = os.path.join(top, 'validation_data', 'C-NMC_test_prelim_phase_data') if layout == 'kaggle' \
        else os.path.join(top, 'phase2')
    csv_path = test_folder + '_labels.csv' if layout == 'kaggle' else os.path.join(top, 'phase2.csv')
    per_patient = patients_per_class + test_patients_per_class
    cells = generated_cells('synthetic_cnmc', per_patient * images_per_patient + num_unlabeled, size, seed)
    test_rows = []
    for label, class_name in enumerate(synthetic.CLASS_NAMES['synthetic_cnmc']):
        for patient in range(per_patient):
            patient_id = f'H{patient + 1}' if class_name == 'hem' else f'{patient + 1}'
            for image in range(images_per_patient):
                name = f'UID_{patient_id}_{image + 1}_1_{class_name}.bmp'
                rgb = cells[label][patient * images_per_patient + image]
                if patient < patients_per_class:
                    write_image(os.path.join(training, f'fold_{patient % 3}', class_name, name), rgb)
                else:
                    new_name = f'{len(test_rows) + 1}.bmp'
                    write_image(os.path.join(test_folder, new_name), rgb)
                    test_rows.append((name, new_name, label))
    if test_rows:
        _write_csv(csv_path, ('Patient_ID', 'new_names', 'labels'), test_rows)
    if layout == 'kaggle':
        for index in range(num_unlabeled):
            write_image(os.path.join(top, 'testing_data', 'C-NMC_test_final_phase_data', f'{index + 1}.bmp'),
                        cells[index % 2][-1 - index // 2])
    return top


ARIA_FOLDERS = ('Benign', 'Early', 'Pre', 'Pro')
ARIA_RENAMED_FOLDERS = ('Benign', '[Malignant] early Pre-B', '[Malignant] Pre-B', '[Malignant] Pro-B')
_ARIA_FILE_PREFIXES = ('WBC-Benign', 'WBC-Malignant-Early', 'WBC-Malignant-Pre', 'WBC-Malignant-Pro')


def make_all_aria_tree(root: str, images_per_class: int = 6, size: int = 48, renamed: bool = False,
                       seed: int = 0) -> str:
    """The Taleqani hospital ALL set: Original/{Benign,Early,Pre,Pro}/WBC-*-NNN.jpg and the same
    cells on black under Segmented/; renamed=True: the flat Kaggle copy with "[Malignant] ..." folders."""
    top = os.path.join(root, 'Blood cell Cancer [ALL]' if renamed else 'ALL_Aria')
    cells = generated_cells('synthetic_all4', images_per_class, size, seed)
    folders = ARIA_RENAMED_FOLDERS if renamed else ARIA_FOLDERS
    for label, (folder, prefix) in enumerate(zip(folders, _ARIA_FILE_PREFIXES)):
        for index, rgb in enumerate(cells[label]):
            name = f'{prefix}-{index + 1:03d}.jpg'
            if renamed:
                write_image(os.path.join(top, folder, name), rgb)
                continue
            write_image(os.path.join(top, 'Original', folder, name), rgb)
            # Segmented: the stained cell kept, the pale background blacked out.
            background = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] < 40
            write_image(os.path.join(top, 'Segmented', folder, name), np.where(background[..., None], 0, rgb))
    return top


def make_all_idb2_tree(root: str, images_per_class: int = 4, size: int = 48, seed: int = 0) -> str:
    """ALL-IDB2: ALL_IDB2/img/ImXXX_Y.tif, blasts (Y = 1) numbered first as in the real set."""
    top = os.path.join(root, 'ALL_IDB2')
    cells = generated_cells('synthetic_cnmc', images_per_class, size, seed)
    number = 1
    for label in (1, 0):
        for rgb in cells[label]:
            write_image(os.path.join(top, 'img', f'Im{number:03d}_{label}.tif'), rgb)
            number += 1
    return top


def make_image_folder_tree(root: str, patients_per_class: int = 2, images_per_patient: int = 3, size: int = 48,
                           with_patients_csv: bool = True, seed: int = 0) -> str:
    """root/cells/<class>/<image>.png for classes blast and normal, with patients.csv (path,patient)."""
    top = os.path.join(root, 'cells')
    cells = generated_cells('synthetic_cnmc', patients_per_class * images_per_patient, size, seed)
    rows = []
    for label, class_name in ((1, 'blast'), (0, 'normal')):
        for index, rgb in enumerate(cells[label]):
            path = os.path.join(class_name, f'cell_{index:03d}.png')
            write_image(os.path.join(top, path), rgb)
            rows.append((path, f'{class_name}-patient-{index // images_per_patient}'))
    if with_patients_csv:
        _write_csv(os.path.join(top, 'patients.csv'), ('path', 'patient'), rows)
    return top
