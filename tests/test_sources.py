"""Real-layout sources on tiny fake trees: records, patients, labels, and every bad layout."""
import os
import shutil

import pytest

from allflax.data import sources
from allflax.data.sources import all_aria, cnmc2019, fake_trees
from allflax.data.sources.listing import LayoutError


def _counts(listing):
    return {name: sum(r.label == label for r in listing.records) for label, name in enumerate(listing.class_names)}


@pytest.fixture(scope='module')
def cnmc_tree(tmp_path_factory):
    # One level down in a private folder: searching two levels up must not reach other tests' trees.
    root = tmp_path_factory.mktemp('cnmc') / 'download'
    return fake_trees.make_cnmc_tree(str(root), patients_per_class=3,
                                     images_per_patient=2, size=32, test_patients_per_class=1)


@pytest.mark.parametrize('name, patient, label', [
    ('UID_H49_35_1_hem.bmp', 'H49', 0),
    ('UID_57_29_1_all.bmp', '57', 1),
    ('UID_3_1_12_ALL.BMP', '3', 1),
])
def test_cnmc_patient_and_label_come_from_the_file_name(name, patient, label):
    assert cnmc2019.parse_file_name(name) == (patient, label)


def test_cnmc_file_name_of_another_form_is_refused():
    with pytest.raises(LayoutError, match='UID_<patient>'):
        cnmc2019.parse_file_name('cell_57.bmp')


def test_cnmc_kaggle_layout(cnmc_tree):
    listing = sources.list_records('cnmc2019', cnmc_tree, 'original')
    assert listing.root == cnmc_tree
    assert listing.class_names == ('hem', 'all')
    train = [r for r in listing.records if not r.official_test]
    test = [r for r in listing.records if r.official_test]
    assert {r.patient for r in train} == {'1', '2', '3', 'H1', 'H2', 'H3'}
    assert {r.patient for r in test} == {'4', 'H4'}
    assert len(train) == 12 and len(test) == 4
    for record in train:  # Label from the folder, agreeing with the name.
        assert record.path.split(os.sep)[-2] == listing.class_names[record.label]
        assert record.path.startswith(os.path.join('training_data', 'fold_'))
    for record in test:  # Renamed test images: label and patient from the CSV's original name.
        assert record.path.startswith(os.path.join('validation_data', 'C-NMC_test_prelim_phase_data'))
        assert record.patient.startswith('H') == (record.label == 0)
    assert listing.unlabeled == tuple(os.path.join('testing_data', 'C-NMC_test_final_phase_data', f'{i}.bmp')
                                      for i in (1, 2))
    assert listing.has_patients


def test_cnmc_challenge_layout(tmp_path):
    root = fake_trees.make_cnmc_tree(str(tmp_path), patients_per_class=3, images_per_patient=1, size=32,
                                     layout='challenge')
    listing = sources.list_records('cnmc2019', root, 'original')
    assert sum(r.official_test for r in listing.records) == 2
    assert all(r.path.startswith('phase2') == r.official_test for r in listing.records)


@pytest.mark.parametrize('levels_up', [0, 1, 2])
def test_data_dir_may_be_up_to_two_levels_above_the_layout(cnmc_tree, tmp_path, levels_up):
    data_dir = cnmc_tree
    for _ in range(levels_up):
        data_dir = os.path.dirname(data_dir)
    assert sources.list_records('cnmc2019', data_dir, 'original').root == cnmc_tree


def test_layout_three_levels_down_is_not_found(tmp_path):
    fake_trees.make_all_idb2_tree(str(tmp_path / 'a' / 'b'), images_per_class=1, size=32)
    with pytest.raises(LayoutError, match='ALL_IDB2/img/ImXXX_Y.tif'):
        sources.list_records('all_idb2', str(tmp_path), 'original')


def test_cnmc_missing_labels_csv_is_named(tmp_path):
    root = fake_trees.make_cnmc_tree(str(tmp_path), patients_per_class=3, images_per_patient=1, size=32)
    csv_path = os.path.join(root, 'validation_data', 'C-NMC_test_prelim_phase_data_labels.csv')
    os.remove(csv_path)
    with pytest.raises(LayoutError, match='labels CSV .* is missing: expected ' + csv_path):
        sources.list_records('cnmc2019', root, 'original')


def test_cnmc_bad_csv_rows_are_all_listed(tmp_path):
    root = fake_trees.make_cnmc_tree(str(tmp_path), patients_per_class=3, images_per_patient=1, size=32)
    csv_path = os.path.join(root, 'validation_data', 'C-NMC_test_prelim_phase_data_labels.csv')
    with open(csv_path, 'a') as f:
        f.write('UID_9_1_1_all.bmp,99.bmp,1\nUID_H4_1_1_hem.bmp,1.bmp,1\n')
    with pytest.raises(LayoutError) as error:
        sources.list_records('cnmc2019', root, 'original')
    assert '99.bmp does not exist' in str(error.value) and 'disagrees' in str(error.value)


def test_cnmc_image_in_the_wrong_class_folder_is_named(tmp_path):
    root = fake_trees.make_cnmc_tree(str(tmp_path), patients_per_class=3, images_per_patient=1, size=32)
    hem_image = os.path.join(root, 'training_data', 'fold_0', 'hem', 'UID_H1_1_1_hem.bmp')
    moved = os.path.join(root, 'training_data', 'fold_0', 'all', 'UID_H1_1_1_hem.bmp')
    shutil.copy(hem_image, moved)
    with pytest.raises(LayoutError, match='folder says the other') as error:
        sources.list_records('cnmc2019', root, 'original')
    assert moved in str(error.value)


def test_unknown_class_folder_is_named_with_the_known_classes(tmp_path):
    root = fake_trees.make_all_aria_tree(str(tmp_path), images_per_class=1, size=32)
    stray = os.path.join(root, 'Original', 'Lymphocyte')
    cell = fake_trees.generated_cells('synthetic_all4', 1, 32, 0)[0][0]
    fake_trees.write_image(os.path.join(stray, 'x.jpg'), cell)
    with pytest.raises(LayoutError, match=f"unknown class folder '{stray}'; known classes: Benign, Early Pre-B"):
        sources.list_records('all_aria', root, 'original')


def test_empty_class_folder_is_named(tmp_path):
    root = fake_trees.make_all_aria_tree(str(tmp_path), images_per_class=1, size=32)
    empty = os.path.join(root, 'Segmented', 'Pre')
    shutil.rmtree(empty)
    os.makedirs(empty)
    with pytest.raises(LayoutError, match=f"class folder '{empty}' has no images"):
        sources.list_records('all_aria', root, 'segmented')


@pytest.mark.parametrize('variant', ['original', 'segmented'])
def test_all_aria_variants(tmp_path, variant):
    root = fake_trees.make_all_aria_tree(str(tmp_path), images_per_class=2, size=32)
    listing = sources.list_records('all_aria', os.path.dirname(root), variant)
    assert listing.root == os.path.join(root, all_aria.VARIANT_FOLDERS[variant])
    assert listing.class_names == ('Benign', 'Early Pre-B', 'Pre-B', 'Pro-B')
    assert _counts(listing) == dict.fromkeys(listing.class_names, 2)
    assert os.path.join('Early', 'WBC-Malignant-Early-001.jpg') in {r.path for r in listing.records}
    assert not listing.has_patients


def test_all_aria_renamed_class_folders(tmp_path):
    root = fake_trees.make_all_aria_tree(str(tmp_path), images_per_class=2, size=32, renamed=True)
    listing = sources.list_records('all_aria', root, 'original')
    assert listing.root == root
    assert _counts(listing) == dict.fromkeys(listing.class_names, 2)
    assert {r.path.split(os.sep)[0]: r.label for r in listing.records} == {
        'Benign': 0, '[Malignant] early Pre-B': 1, '[Malignant] Pre-B': 2, '[Malignant] Pro-B': 3}
    with pytest.raises(LayoutError, match='Segmented/<class>'):
        sources.list_records('all_aria', root, 'segmented')


def test_all_aria_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="data.variant='color'.*original, segmented"):
        sources.list_records('all_aria', str(tmp_path), 'color')


def test_all_idb2(tmp_path):
    root = fake_trees.make_all_idb2_tree(str(tmp_path), images_per_class=3, size=32)
    listing = sources.list_records('all_idb2', str(tmp_path), 'original')
    assert listing.root == root and listing.class_names == ('normal', 'blast')
    assert [(r.path, r.label) for r in listing.records[:4]] == [
        (os.path.join('img', 'Im001_1.tif'), 1), (os.path.join('img', 'Im002_1.tif'), 1),
        (os.path.join('img', 'Im003_1.tif'), 1), (os.path.join('img', 'Im004_0.tif'), 0)]
    cell = fake_trees.generated_cells('synthetic_cnmc', 1, 32, 0)[0][0]
    fake_trees.write_image(os.path.join(root, 'img', 'Im007.tif'), cell)
    with pytest.raises(LayoutError, match='Im007.tif'):
        sources.list_records('all_idb2', root, 'original')


def test_image_folder_with_patients_csv(tmp_path):
    root = fake_trees.make_image_folder_tree(str(tmp_path), patients_per_class=2, images_per_patient=2, size=32)
    listing = sources.list_records('image_folder', root, 'original')
    assert listing.class_names == ('blast', 'normal')
    assert {r.patient for r in listing.records} == {f'{c}-patient-{p}' for c in ('blast', 'normal') for p in (0, 1)}
    with open(os.path.join(root, 'patients.csv'), 'w') as f:
        f.write('path,patient\nblast/cell_000.png,p1\n')
    with pytest.raises(LayoutError, match='no patient for 7 image'):
        sources.list_records('image_folder', root, 'original')
    os.remove(os.path.join(root, 'patients.csv'))
    assert not sources.list_records('image_folder', root, 'original').has_patients


def test_data_dir_that_is_another_layout_says_what_was_expected(tmp_path):
    root = fake_trees.make_all_aria_tree(str(tmp_path), images_per_class=1, size=32)
    with pytest.raises(LayoutError, match=r'does not hold the C-NMC 2019 layout: C-NMC_Leukemia/training_data'):
        sources.list_records('cnmc2019', root, 'original')


@pytest.mark.parametrize('name', list(sources.REAL))
def test_unset_missing_or_empty_data_dir(tmp_path, name):
    with pytest.raises(LayoutError, match='data.dir is not set: pass --config.data.dir='):
        sources.list_records(name, '', 'original')
    with pytest.raises(LayoutError, match='is not a folder'):
        sources.list_records(name, str(tmp_path / 'missing'), 'original')
    with pytest.raises(LayoutError, match='is empty: expected'):
        sources.list_records(name, str(tmp_path), 'original')


def test_unknown_name_lists_every_available_one():
    with pytest.raises(ValueError) as error:
        sources.list_records('cnmc', '', 'original')
    for name in ('synthetic_all4', 'synthetic_cnmc', 'cnmc2019', 'all_aria', 'all_idb2', 'image_folder'):
        assert name in str(error.value)
