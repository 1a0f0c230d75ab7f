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


def _assert_partition(result, labels, patients=None):
    """Every image in exactly one split and, given patients, no patient in two."""
    assert list(result) == ["train", "val", "test"]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(result.values()))), np.arange(len(labels)))
    if patients is not None:
        patient_sets = [set(patients[indices]) for indices in result.values()]
        assert sum(len(s) for s in patient_sets) == len(set().union(*patient_sets))


def test_k_fold_tests_each_patient_exactly_once():
    labels, patients = _dataset(num_patients=25, num_classes=2)
    tested = []
    for fold in range(5):
        result = splits.make_splits(labels, patients, method="patient", fractions=FRACTIONS, seed=0, fold=fold,
                                    num_folds=5)
        _assert_partition(result, labels, patients)
        tested.append(set(patients[result["test"]]))
        assert len(tested[-1]) == 5
        # The rest: train and val in the ratio 0.7 : 0.15.
        assert len(set(patients[result["train"]])) > 3 * len(set(patients[result["val"]]))
    assert set().union(*tested) == set(patients) and sum(map(len, tested)) == 25


def test_official_split_tests_on_the_official_set():
    labels, patients = _dataset(num_patients=20, num_classes=2)
    official = np.isin(patients, ["P000", "P001", "P002", "P003"])
    result = splits.make_splits(labels, patients, method="official", fractions=FRACTIONS, seed=0,
                                official_test=official)
    _assert_partition(result, labels, patients)
    np.testing.assert_array_equal(result["test"], np.flatnonzero(official))
    with pytest.raises(ValueError, match="needs the source's labelled test set"):
        splits.make_splits(labels, patients, method="official", fractions=FRACTIONS, seed=0,
                           official_test=np.zeros(len(labels), bool))
    with pytest.raises(ValueError, match="set data.fold=-1"):
        splits.make_splits(labels, patients, method="official", fractions=FRACTIONS, seed=0, fold=1,
                           official_test=official)


def test_random_split_is_by_image_and_warns(caplog):
    labels, patients = _dataset(num_patients=4, num_classes=2)
    result = splits.make_splits(labels, patients, method="random", fractions=FRACTIONS, seed=0)
    _assert_partition(result, labels)
    assert len(set(patients[result["train"]]) & set(patients[result["test"]])) > 0
    assert "splits images, not patients" in caplog.text


def test_images_without_patient_ids_are_split_one_by_one_with_a_loud_warning(caplog):
    labels = np.arange(40) % 4
    result = splits.make_splits(labels, np.full(40, ""), method="patient", fractions=FRACTIONS, seed=0)
    _assert_partition(result, labels)
    assert [len(result[name]) for name in result] == [28, 6, 6]
    assert "40 of 40 images have no patient id" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="by_cell"), "unknown data.split='by_cell'; known: patient, official, random"),
    (dict(method="patient", fold=5, num_folds=5), r"data.fold=5 must be in \[0, data.num_folds=5\)"),
])
def test_bad_split_settings_are_refused(kwargs, message):
    labels, patients = _dataset()
    with pytest.raises(ValueError, match=message):
        splits.make_splits(labels, patients, fractions=FRACTIONS, seed=0, **kwargs)


def test_near_duplicate_pairs_are_across_splits_only():
    hashes = np.array([0b0, 0b111, 0b1111_0000_0000, 0b1, 2**63 - 1], np.uint64)
    indices = {"train": np.array([0, 2]), "val": np.array([1, 4]), "test": np.array([3])}
    assert splits.near_duplicate_pairs(hashes, indices, max_distance=3) == [(0, 1, 3), (0, 3, 1), (1, 3, 2)]
    assert splits.near_duplicate_pairs(hashes, indices, max_distance=0) == []


def test_describe_leaves_out_missing_patient_ids():
    summary = splits.describe({"train": np.array([0, 1])}, np.array([0, 1]), np.array(["", ""]), ("a", "b"))
    assert summary["train"]["patients"] == []


def test_near_duplicate_pairs_match_a_plain_loop_across_blocks():
    # The first split is over one block (1024 images); hashes as preprocess.perceptual_hash returns them
    # (Python ints, half with the top bit set); a few planted copies 0-5 bits away, one within a split.
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**64, size=1070, dtype=np.uint64)]
    for first, second, bits in [(5, 1030, 0), (1024, 1060, 2), (1029, 1069, 4), (7, 1050, 5), (1026, 1028, 1)]:
        hashes[second] = hashes[first] ^ sum(1 << int(b) for b in rng.choice(64, bits, replace=False))
    indices = {"train": np.arange(1030), "val": np.arange(1030, 1050), "test": np.arange(1050, 1070)}
    names = list(indices)
    expected = sorted((a, b, bin(hashes[a] ^ hashes[b]).count("1"))
                      for i, first in enumerate(names) for second in names[i + 1:]
                      for a in indices[first].tolist() for b in indices[second].tolist()
                      if bin(hashes[a] ^ hashes[b]).count("1") <= 4)
    assert sorted(splits.near_duplicate_pairs(hashes, indices)) == expected
    assert [(a, b) for a, b, _ in expected] == [(5, 1030), (1024, 1060), (1029, 1069)]


def test_k_fold_with_two_folds_and_train_val_fractions_alone():
    labels, patients = _dataset(num_patients=10, num_classes=2)
    tested = []
    for fold in range(2):
        result = splits.make_splits(labels, patients, method="patient", fractions={"train": 0.8, "val": 0.2}, seed=0,
                                    fold=fold, num_folds=2)
        _assert_partition(result, labels, patients)
        tested.append(set(patients[result["test"]]))
    assert tested[0] | tested[1] == set(patients) and not tested[0] & tested[1]
    with pytest.raises(ValueError, match="num_folds >= 2"):
        splits.make_splits(labels, patients, method="patient", fractions=FRACTIONS, seed=0, fold=0, num_folds=1)
    fractions = {"train": 0.7, "test": 0.3}
    with pytest.raises(ValueError, match=str(fractions)):
        splits.make_splits(labels, patients, method="patient", fractions=fractions, seed=0, fold=0, num_folds=2)


def test_official_split_has_no_folds_and_leaves_out_patients_on_both_sides(caplog):
    labels, patients = _dataset(num_patients=20, num_classes=2)
    official = np.isin(patients, ["P000", "P001"])
    p002 = np.flatnonzero(patients == "P002")
    official[p002[:1]] = True  # One image of P002 in the official test set, its others in the training folds.
    official[np.flatnonzero(patients == "P003")[:2]] = True  # And two of P003's.
    with pytest.raises(ValueError, match="set data.fold=-1"):
        splits.make_splits(labels, patients, method="official", fractions=FRACTIONS, seed=0, fold=0,
                           official_test=official)
    result = splits.make_splits(labels, patients, method="official", fractions=FRACTIONS, seed=0,
                                official_test=official)
    # By hand: the training-fold images of P002 and P003, neither in train nor in val.
    left_out = np.sort(np.concatenate([p002[1:], np.flatnonzero(patients == "P003")[2:]]))
    assert len(left_out) == (patients == "P002").sum() + (patients == "P003").sum() - 3 > 0
    np.testing.assert_array_equal(splits.official_overlap(patients, official), left_out)
    np.testing.assert_array_equal(result["test"], np.flatnonzero(official))
    np.testing.assert_array_equal(np.sort(np.concatenate([result["train"], result["val"]])),
                                  np.setdiff1d(np.flatnonzero(~official), left_out))
    assert not {"P002", "P003"} & set(patients[np.concatenate([result["train"], result["val"]])])
    warnings = [record.getMessage() for record in caplog.records if "official" in record.getMessage()]
    assert len(warnings) == 1 and "P002, P003" in warnings[0] and f"their {len(left_out)} training-fold" in warnings[0]
    assert "P000" not in warnings[0] and "P001" not in warnings[0]


def test_describe_counts_classes_a_split_lacks():
    labels = np.array([0, 0, 1, 2])
    summary = splits.describe({"train": np.array([0, 1]), "test": np.array([2, 3])}, labels,
                              np.array(["a", "a", "b", "c"]), ("x", "y", "z"))
    assert summary["train"]["class_counts"] == {"x": 2, "y": 0, "z": 0}
    assert summary["test"]["class_counts"] == {"x": 0, "y": 1, "z": 1}


def test_mismatched_or_non_vector_labels_are_refused():
    with pytest.raises(ValueError, match=r"\(3,\) and patients \(2,\)"):
        splits.patient_split(np.array([0, 1, 0]), np.array(["a", "b"]), FRACTIONS, seed=0)
    with pytest.raises(ValueError, match="equal-length vectors"):
        splits.patient_split(np.zeros((2, 3), int), np.full((2, 3), "a"), FRACTIONS, seed=0)



def _components_by_a_plain_loop(hashes, max_distance):
    """Each image's smallest connected index, by repeated relaxation over all pairs."""
    label = list(range(len(hashes)))
    changed = True
    while changed:
        changed = False
        for a in range(len(hashes)):
            for b in range(len(hashes)):
                if bin(hashes[a] ^ hashes[b]).count("1") <= max_distance and label[b] < label[a]:
                    label[a], changed = label[b], True
    return label


def test_near_duplicate_groups_join_chains_across_blocks():
    # 300 random hashes, with a chain 3 -> 150 -> 299 (each link 2-4 bits, the ends up to 8 apart), a
    # pair 10 -> 11 at 0 bits and a near miss 20 -> 21 at 5 bits; blocks of 16 rows (4,800 distances).
    rng = np.random.default_rng(1)
    hashes = [int(h) for h in rng.integers(0, 2**64, size=300, dtype=np.uint64)]
    for first, second, bits in [(3, 150, 4), (150, 299, 2), (10, 11, 0), (20, 21, 5)]:
        hashes[second] = hashes[first] ^ sum(1 << int(b) for b in rng.choice(64, bits, replace=False))
    groups, pairs = splits.near_duplicate_groups(hashes, max_block_entries=16 * 300)
    reference = _components_by_a_plain_loop(hashes, 4)
    # The same partition as the plain loop: equal labels exactly where the loop's are equal.
    np.testing.assert_array_equal(groups[:, None] == groups[None, :],
                                  np.equal.outer(reference, reference))
    assert groups[3] == groups[150] == groups[299] and groups[10] == groups[11] and groups[20] != groups[21]
    assert pairs == sum(bin(hashes[a] ^ hashes[b]).count("1") <= 4 for a in range(300) for b in range(a + 1, 300))
    assert len(set(groups.tolist())) == 300 - 3


def test_images_without_patient_ids_keep_their_near_duplicate_groups_in_one_split():
    # 60 images without patient ids, two classes; planted groups of 2-5 near-identical images.
    labels = np.arange(60) % 2
    patients = np.full(60, "")
    image_groups = np.arange(60)
    planted = [[0, 2, 4, 6, 8], [1, 31], [10, 12, 14], [21, 23, 25, 27], [40, 42]]
    for members in planted:
        image_groups[members] = members[0]
    split_of = {}
    for seed in range(5):
        result = splits.make_splits(labels, patients, method="patient", fractions=FRACTIONS, seed=seed,
                                    image_groups=image_groups)
        split_of = {int(i): name for name, indices in result.items() for i in indices}
        assert sorted(split_of) == list(range(60))
        for members in planted:
            assert len({split_of[i] for i in members}) == 1, (seed, members)
        # Without the groups some planted group is split apart at this seed (the grouping is what keeps it).
        alone = splits.make_splits(labels, patients, method="patient", fractions=FRACTIONS, seed=seed)
        alone_of = {int(i): name for name, indices in alone.items() for i in indices}
        assert any(len({alone_of[i] for i in members}) > 1 for members in planted)
    # data.split='random' splits images on purpose: no grouping.
    random_split = splits.make_splits(labels, patients, method="random", fractions=FRACTIONS, seed=0,
                                      image_groups=image_groups)
    by_image = splits.make_splits(labels, patients, method="random", fractions=FRACTIONS, seed=0)
    for name in FRACTIONS:
        np.testing.assert_array_equal(random_split[name], by_image[name])


def test_split_independence_says_image_level_where_patients_do_not_bound_the_split():
    assert splits.split_independence("patient", 0, 2)["level"] == "patient"
    for method, missing in [("random", 0), ("patient", 1)]:
        found = splits.split_independence(method, missing, 2)
        assert found["level"] == "image"
        assert found["statement"].startswith("image-level split: not patient-independent: ")
    assert "1 of 2 images have no patient id; near-duplicate" in splits.split_independence("patient", 1, 2)["statement"]
    assert "each was split on its own" in splits.split_independence("patient", 1, 2, grouped=False)["statement"]
