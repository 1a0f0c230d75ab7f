"""Patient-wise, class-stratified train/val/test splits.

Images of one patient share stain, illumination and diagnosis, so a split that
puts a patient on both sides lets a model score by recognising the patient.
Every patient therefore goes wholly to one split. Images without a patient id go by
near-duplicate group (`near_duplicate_groups`): a split that cannot be patient-independent
at least keeps copies of one cell or field together.
"""

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from absl import logging

SPLIT_METHODS = ("patient", "official", "random")
# Hamming distance between 64-bit perceptual hashes at or below which two images count as near-duplicates:
# re-encoded or rescaled copies differ by 0-2 bits; distinct synthetic cells by 8+ (smears), 4+ (on black).
NEAR_DUPLICATE_MAX_DISTANCE = 4
# What metrics.json, the report and the card say of a split that patients do not bound.
IMAGE_LEVEL = "image-level split: not patient-independent"


def _check_fractions(fractions: dict[str, float]) -> None:
    values = list(fractions.values())
    if not values or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"Split fractions must be positive and sum to 1, got {fractions}.")


def _apportion(targets: np.ndarray, total: int) -> np.ndarray:
    """Splits total into integer counts near targets, at least 1 each when possible."""
    counts = np.ones(len(targets), int) if total >= len(targets) else np.zeros(len(targets), int)
    for _ in range(total - counts.sum()):
        counts[np.argmax(targets - counts)] += 1
    return counts


def patient_split(labels: np.ndarray, patients: np.ndarray, fractions: dict[str, float],
                  seed: int) -> dict[str, np.ndarray]:
    """Image indices per split; each patient's images go wholly to one split.

    Patients are grouped by their majority class, shuffled by seed, and allotted
    to the splits in proportion to fractions, with at least one patient of the
    class per split when the class has as many patients as there are splits.
    Rounding left over by one class is carried to the next, so the totals also
    follow the fractions.

    Args:
        labels: int class of each image.
        patients: patient id of each image.
        fractions: split name -> share of the patients, positive, summing to 1.
        seed: shuffles which patients land in which split.

    Returns:
        Split name -> sorted int64 image indices.
    """
    _check_fractions(fractions)
    labels = np.asarray(labels)
    patients = np.asarray(patients)
    if labels.shape != patients.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and patients {patients.shape} must be equal-length vectors.")
    unique_patients, patient_of_image = np.unique(patients, return_inverse=True)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    class_counts = np.zeros((len(unique_patients), num_classes), int)
    np.add.at(class_counts, (patient_of_image, labels), 1)
    patient_class = class_counts.argmax(1)

    shares = np.array(list(fractions.values()))
    split_of_patient = np.empty(len(unique_patients), int)
    carried = np.zeros(len(shares))
    for label in range(num_classes):
        members = np.flatnonzero(patient_class == label)
        members = np.random.default_rng([seed, label]).permutation(members)
        targets = shares * len(members) + carried
        counts = _apportion(targets, len(members))
        carried = targets - counts
        split_of_patient[members] = np.repeat(np.arange(len(shares)), counts)

    split_of_image = split_of_patient[patient_of_image]
    return {name: np.flatnonzero(split_of_image == k) for k, name in enumerate(fractions)}


def describe(split_indices: dict[str, np.ndarray], labels: np.ndarray, patients: np.ndarray,
             class_names: tuple[str, ...]) -> dict:
    """JSON-ready summary per split: example count, patients and class counts."""
    summary = {}
    for name, indices in split_indices.items():
        counts = np.bincount(labels[indices], minlength=len(class_names))
        summary[name] = {
            "num_examples": int(len(indices)),
            "patients": sorted(str(p) for p in np.unique(patients[indices]) if p),
            "class_counts": {class_name: int(n) for class_name, n in zip(class_names, counts)},
        }
    return summary


def _train_val_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """The train:val ratio of data.split_fractions, for splits whose test part is fixed otherwise."""
    if not {"train", "val"} <= set(fractions):
        raise ValueError(f"data.split_fractions needs train and val entries, got {fractions}.")
    total = fractions["train"] + fractions["val"]
    return {"train": fractions["train"] / total, "val": fractions["val"] / total}


def _splitting_units(patients: np.ndarray, method: str, image_groups: np.ndarray | None = None) -> np.ndarray:
    """What is kept whole: the patient; where there is no patient id, the image's near-duplicate
    group (`image_groups`, one label per image) or else the image; the image when asked (random)."""
    per_image = np.array([f"image {i}" for i in range(len(patients))])
    if method == "random":
        logging.warning("data.split='random' splits images, not patients: images of one patient can land "
                        "in several splits and make scores optimistic. Use it only to compare with work "
                        "that did the same.")
        return per_image
    missing = patients == ""
    if missing.any():
        kept = ("near-duplicates (perceptual hash within %d bits) are kept in one split, the other images "
                "are split one by one" % NEAR_DUPLICATE_MAX_DISTANCE if image_groups is not None
                else "each is split on its own")
        logging.warning(
            "\n%s\n%d of %d images have no patient id: %s, so images of one patient may leak across "
            "train, val and test, and scores may be optimistic (an image-level split: not patient-independent). "
            "Prefer a data set with patient ids for claims.\n%s",
            "!" * 80, missing.sum(), len(patients), kept, "!" * 80)
    if image_groups is not None:
        per_image = np.char.add("near-duplicate group ", np.asarray(image_groups).astype(str))
    return np.where(missing, per_image, patients)


def make_splits(labels: np.ndarray, patients: np.ndarray, *, method: str, fractions: dict[str, float],
                seed: int, fold: int = -1, num_folds: int = 5,
                official_test: np.ndarray | None = None,
                image_groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Train, val and test image indices as data.split, data.fold and data.num_folds ask.

    - fold >= 0: k-fold by patient (by image for `random`); that fold is the test split, the other
      patients go to train and val in the ratio of their fractions.
    - method `official`: test is the source's own labelled test set (`official_test` mask); the
      other patients go to train and val likewise, without the training-fold images of patients
      who are also in the official test set (`official_overlap`), which are named in a warning.
    - otherwise `patient_split` by fractions.
    Images without a patient id are split by their `image_groups` label (`near_duplicate_groups`),
    else one by one, with a loud warning.
    """
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown data.split={method!r}; known: {', '.join(SPLIT_METHODS)}")
    labels = np.asarray(labels)
    units = _splitting_units(np.asarray(patients), method, image_groups)
    left_out = np.zeros(0, int)  # `official`: training-fold images of official test patients.
    if method == "official":
        if fold >= 0:
            raise ValueError(f"data.split='official' has a fixed test set; set data.fold=-1 (got {fold})")
        if official_test is None or not np.any(official_test):
            raise ValueError("data.split='official' needs the source's labelled test set (cnmc2019: "
                             "the preliminary-phase set with its labels CSV), and this data has none")
        test = np.flatnonzero(official_test)
        left_out = official_overlap(units, official_test)
        if len(left_out):
            logging.warning("patients in both the official test set and the training folds: %s; their %d "
                            "training-fold images are left out of train and val (removed_overlap in splits.json)",
                            ", ".join(sorted(set(units[left_out]))), len(left_out))
    elif fold >= 0:
        if not 0 <= fold < num_folds or num_folds < 2:
            raise ValueError(f"data.fold={fold} must be in [0, data.num_folds={num_folds}), with num_folds >= 2")
        folds = patient_split(labels, units, {str(k): 1 / num_folds for k in range(num_folds)}, seed=seed)
        test = folds[str(fold)]
    else:
        return patient_split(labels, units, fractions, seed=seed)
    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([test, left_out]))
    train_val = patient_split(labels[rest], units[rest], _train_val_fractions(fractions), seed=seed)
    return {"train": rest[train_val["train"]], "val": rest[train_val["val"]], "test": test}


def official_overlap(patients: np.ndarray, official_test: np.ndarray) -> np.ndarray:
    """Sorted indices of the training-fold images whose patient is also in the official test set: a
    patient on both sides would let the model score by recognising the patient, so `make_splits`
    leaves these images out of train and val. Images without a patient id never overlap."""
    patients, official_test = np.asarray(patients), np.asarray(official_test, bool)
    shared = set(patients[official_test].tolist()) - {""}
    return np.flatnonzero(~official_test & np.isin(patients, list(shared)))


def near_duplicate_pairs(hashes: np.ndarray, indices: dict[str, np.ndarray],
                         max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """(image, image, Hamming distance) for images in different splits whose 64-bit perceptual
    hashes differ in at most max_distance bits: likely the same cell or field seen twice."""
    hashes = np.asarray(hashes, np.uint64)
    names = list(indices)
    pairs = []
    for position, first in enumerate(names):
        for second in names[position + 1:]:
            others = indices[second]
            for start in range(0, len(indices[first]), 1024):  # Bounded memory for big splits.
                block = indices[first][start:start + 1024]
                distances = np.bitwise_count(hashes[block, None] ^ hashes[None, others])
                rows, columns = np.nonzero(distances <= max_distance)
                pairs.extend(zip(block[rows].tolist(), others[columns].tolist(), distances[rows, columns].tolist()))
    return pairs


def near_duplicate_groups(hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE,
                          max_block_entries: int = 1 << 24) -> tuple[np.ndarray, int]:
    """Each image's group and the number of near-duplicate pairs: the connected components of the
    graph whose edges join images whose 64-bit perceptual hashes differ in at most max_distance
    bits, so that a chain of near-duplicates stays together. Blocks of rows against the later
    images bound the memory (max_block_entries distances at a time); the pairs are few."""
    hashes = np.asarray(hashes, np.uint64)
    count = len(hashes)
    rows_per_block = max(1, max_block_entries // max(count, 1))
    first, second = [], []
    for start in range(0, count, rows_per_block):
        block = hashes[start:start + rows_per_block]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, start:])
        rows, columns = np.nonzero(distances <= max_distance)
        later = columns > rows  # Column c is image start + c: each pair once, no image with itself.
        first.append(start + rows[later])
        second.append(start + columns[later])
    first, second = (np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in (first, second))
    graph = scipy.sparse.coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1], int(len(first))


def split_independence(method: str, images_without_patient_id: int, images: int, *, grouped: bool = True) -> dict:
    """What the split guarantees, for metrics.json, the report and the card: {'level': 'patient'
    or 'image', 'statement'}. A split is patient-independent only where every image has a patient
    id and the split keeps patients whole. `grouped`: near-duplicates were kept together (runs
    split before `near_duplicate_groups` existed were not)."""
    if method == "random":
        reason = "data.split='random' splits images: images of one patient can be in train and test"
    elif images_without_patient_id:
        kept = (f"near-duplicate images (perceptual hash within {NEAR_DUPLICATE_MAX_DISTANCE} bits) were kept in one "
                "split, but other" if grouped else "each was split on its own, so near-duplicate and")
        reason = (f"{images_without_patient_id} of {images} images have no patient id; {kept} images of one patient "
                  "can be in train and test")
    else:
        return {"level": "patient", "statement": "patient-level split: each patient's images are in one split"}
    return {"level": "image", "statement": f"{IMAGE_LEVEL}: {reason}"}
