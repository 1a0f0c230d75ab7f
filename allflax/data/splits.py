"""Patient-wise, class-stratified train/val/test splits.

Images of one patient share stain, illumination and diagnosis, so a split that
puts a patient on both sides lets a model score by recognising the patient.
Every patient therefore goes wholly to one split.
"""

import numpy as np


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
            "patients": sorted(str(p) for p in np.unique(patients[indices])),
            "class_counts": {class_name: int(n) for class_name, n in zip(class_names, counts)},
        }
    return summary
