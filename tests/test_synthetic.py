"""Tests for the embedded synthetic cell datasets."""

import os

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from allflax.data import splits
from allflax.data.sources import synthetic

NAMES = sorted(synthetic.CLASS_NAMES)
SMALL = dict(num_images=40, image_size=32, num_patients=8, seed=3)


@pytest.mark.parametrize("name", NAMES)
def test_generate_is_deterministic_by_seed(name):
    first = synthetic.generate(name, **SMALL)
    second = synthetic.generate(name, **SMALL)
    other_seed = synthetic.generate(name, **{**SMALL, "seed": 4})
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.patients, second.patients)
    assert not np.array_equal(first.images, other_seed.images)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("image_size", [32, 45, 300])
def test_shapes_and_dtypes(name, image_size):
    data = synthetic.generate(name, num_images=9, image_size=image_size, num_patients=8, seed=0)
    assert data.images.shape == (9, image_size, image_size, 3)
    assert data.images.dtype == np.uint8
    assert data.labels.shape == data.patients.shape == (9,)
    assert data.labels.dtype == np.int32
    assert data.patients.dtype.kind == "U"
    assert data.class_names == synthetic.CLASS_NAMES[name]


@pytest.mark.parametrize("name", NAMES)
def test_classes_are_balanced_and_patients_have_one_class(name):
    data = synthetic.generate(name, num_images=103, image_size=32, num_patients=12, seed=1)
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    assert counts.max() - counts.min() <= 1
    for patient in np.unique(data.patients):
        assert len(np.unique(data.labels[data.patients == patient])) == 1


def test_patient_ids_follow_the_real_datasets():
    all4 = synthetic.generate("synthetic_all4", **SMALL)
    assert all(p.startswith("P") and len(p) == 4 for p in all4.patients)
    cnmc = synthetic.generate("synthetic_cnmc", **SMALL)
    np.testing.assert_array_equal(np.char.startswith(cnmc.patients, "H"), cnmc.labels == 0)
    assert all(p.isdigit() for p in cnmc.patients[cnmc.labels == 1])


def test_cnmc_cells_are_segmented_on_black():
    data = synthetic.generate("synthetic_cnmc", **SMALL)
    corners = data.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() == 0


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="'nope'.*synthetic_all4.*synthetic_cnmc"):
        synthetic.generate("nope", **SMALL)


@pytest.mark.parametrize("bad_arg, match", [
    (dict(num_images=3), "num_images=3"),
    (dict(num_patients=7), "num_patients=7"),
    (dict(image_size=31), "image_size=31"),
])
def test_invalid_sizes_are_rejected(bad_arg, match):
    with pytest.raises(ValueError, match=match):
        synthetic.generate("synthetic_all4", **{**SMALL, **bad_arg})


def _assert_same(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.patients, b.patients)
    assert a.class_names == b.class_names


def test_load_reads_the_cache_on_second_call(tmp_path, monkeypatch):
    first = synthetic.load("synthetic_all4", cache_dir=str(tmp_path), **SMALL)
    assert os.listdir(tmp_path) == [os.path.basename(
        synthetic.cache_path("synthetic_all4", cache_dir=str(tmp_path), **SMALL))]

    def fail(*args, **kwargs):
        raise AssertionError("generate called despite a valid cache")

    monkeypatch.setattr(synthetic, "generate", fail)
    _assert_same(first, synthetic.load("synthetic_all4", cache_dir=str(tmp_path), **SMALL))


def test_truncated_cache_is_regenerated(tmp_path):
    path = synthetic.cache_path("synthetic_cnmc", cache_dir=str(tmp_path), **SMALL)
    fresh = synthetic.load("synthetic_cnmc", cache_dir=str(tmp_path), **SMALL)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _assert_same(fresh, synthetic.load("synthetic_cnmc", cache_dir=str(tmp_path), **SMALL))
    _assert_same(fresh, synthetic.load("synthetic_cnmc", cache_dir=str(tmp_path), **SMALL))
    assert os.path.getsize(path) > 0 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cache_key_changes_with_every_argument(monkeypatch):
    base = dict(name="synthetic_all4", cache_dir="/c", **SMALL)
    variants = [base, {**base, "name": "synthetic_cnmc"}, {**base, "num_images": 41}, {**base, "image_size": 33},
                {**base, "num_patients": 9}, {**base, "seed": 4}]
    paths = {synthetic.cache_path(**v) for v in variants}
    assert len(paths) == len(variants)
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert synthetic.cache_path(**base) not in paths


def _mean_colour(images):
    return images.reshape(len(images), -1, 3).mean(1)


def _morphology_features(images):
    """Histograms of standardised grey level and gradient magnitude: blind to colour and stain."""
    features = []
    for image in images:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        grey = (grey - grey.mean()) / (grey.std() + 1e-6)
        gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
        features.append(np.concatenate([np.histogram(grey, 16, (-3, 3))[0], np.histogram(gradient, 16, (0, 8))[0]]))
    return np.array(features, np.float32) / images[0, ..., 0].size


def _held_out_accuracy(data, features):
    """Logistic regression accuracy on patients unseen in training."""
    split = splits.patient_split(data.labels, data.patients, {"train": 0.6, "test": 0.4}, seed=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[split["train"]], data.labels[split["train"]])
    return model.score(features[split["test"]], data.labels[split["test"]])


# Many small patients, so held-out accuracy is not dominated by a few patients' colours.
@pytest.mark.parametrize("name, image_size, max_colour_accuracy, min_morphology_accuracy", [
    ("synthetic_all4", 40, 0.25 + 0.12, 0.6),
    ("synthetic_cnmc", 32, 0.62, 0.65),
])
def test_mean_colour_is_uninformative_but_morphology_is_learnable(name, image_size, max_colour_accuracy,
                                                                   min_morphology_accuracy):
    data = synthetic.generate(name, num_images=800, image_size=image_size, num_patients=200, seed=0)
    assert _held_out_accuracy(data, _mean_colour(data.images)) < max_colour_accuracy
    assert _held_out_accuracy(data, _morphology_features(data.images)) > min_morphology_accuracy
