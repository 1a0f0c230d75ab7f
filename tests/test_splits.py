"""Tests for patient-wise, class-stratified splits."""

import numpy as np
import pytest

from allflax.data import splits

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _dataset(num_patients=40, num_classes=4, seed=0):
    """Labels and patient ids: each patient one class, 1..20 images each."""
    rng = np.random.default_rng(seed)
    images_per_patient = rng.integers(1, 21, num_patients)
    patient_ids = np.array([f"P{p:03d}" for p in range(num_patients)])
    patients = np.repeat(patient_ids, images_per_patient)
    labels = np.repeat(np.arange(num_patients) % num_classes, images_per_patient)
    order = rng.permutation(len(labels))
    return labels[order], patients[order]


def test_splits_cover_every_image_once_and_keep_patients_whole():
    labels, patients = _dataset()
    result = splits.patient_split(labels, patients, FRACTIONS, seed=0)
    assert list(result) == list(FRACTIONS)
    all_indices = np.concatenate(list(result.values()))
    np.testing.assert_array_equal(np.sort(all_indices), np.arange(len(labels)))
    for indices in result.values():
        np.testing.assert_array_equal(indices, np.sort(indices))
    patient_sets = [set(patients[indices]) for indices in result.values()]
    for i, first in enumerate(patient_sets):
        for second in patient_sets[i + 1:]:
            assert not first & second


def test_every_split_gets_every_class_and_patient_shares_follow_fractions():
    labels, patients = _dataset(num_patients=40, num_classes=4)
    result = splits.patient_split(labels, patients, FRACTIONS, seed=1)
    for indices in result.values():
        assert set(labels[indices]) == {0, 1, 2, 3}
    patient_counts = {name: len(set(patients[indices])) for name, indices in result.items()}
    assert patient_counts == {"train": 28, "val": 6, "test": 6}


def test_small_classes_are_still_split_when_possible():
    labels, patients = _dataset(num_patients=6, num_classes=2)
    result = splits.patient_split(labels, patients, FRACTIONS, seed=0)
    for indices in result.values():
        assert set(labels[indices]) == {0, 1}


def test_class_with_fewer_patients_than_splits_goes_to_the_largest_split():
    labels = np.array([0, 0, 1, 1, 1, 1])
    patients = np.array(["a", "a", "b", "c", "d", "e"])
    result = splits.patient_split(labels, patients, FRACTIONS, seed=0)
    assert "a" in set(patients[result["train"]])
    assert {name: len(set(patients[indices])) for name, indices in result.items()} == {"train": 3, "val": 1,
                                                                                        "test": 1}


def test_patient_class_is_its_majority_class():
    # Patient a is mostly class 1: stratification must pair it with d, not with b and c.
    labels = np.array([1, 1, 0, 1, 0, 0])
    patients = np.array(["a", "a", "a", "d", "b", "c"])
    for seed in range(10):
        result = splits.patient_split(labels, patients, {"train": 0.5, "test": 0.5}, seed=seed)
        for indices in result.values():
            split_patients = set(patients[indices])
            assert len(split_patients & {"b", "c"}) == 1 and len(split_patients & {"a", "d"}) == 1


def test_split_is_deterministic_by_seed():
    labels, patients = _dataset()
    first = splits.patient_split(labels, patients, FRACTIONS, seed=5)
    second = splits.patient_split(labels, patients, FRACTIONS, seed=5)
    other = splits.patient_split(labels, patients, FRACTIONS, seed=6)
    for name in FRACTIONS:
        np.testing.assert_array_equal(first[name], second[name])
    assert any(not np.array_equal(first[name], other[name]) for name in FRACTIONS)


@pytest.mark.parametrize("fractions", [
    {"train": 0.7, "val": 0.2},
    {"train": 0.7, "val": 0.4, "test": -0.1},
    {"train": 1.0, "val": 0.0},
    {},
])
def test_bad_fractions_are_rejected(fractions):
    labels, patients = _dataset()
    with pytest.raises(ValueError, match="fractions"):
        splits.patient_split(labels, patients, fractions, seed=0)


def test_describe_summarises_each_split():
    labels, patients = _dataset(num_patients=12, num_classes=2)
    result = splits.patient_split(labels, patients, FRACTIONS, seed=0)
    summary = splits.describe(result, labels, patients, ("hem", "all"))
    assert list(summary) == list(FRACTIONS)
    for name, indices in result.items():
        entry = summary[name]
        assert entry["num_examples"] == len(indices)
        assert entry["patients"] == sorted(set(patients[indices].tolist()))
        assert all(type(p) is str for p in entry["patients"])
        assert entry["class_counts"] == {"hem": int((labels[indices] == 0).sum()),
                                         "all": int((labels[indices] == 1).sum())}
        assert all(type(n) is int for n in entry["class_counts"].values())
