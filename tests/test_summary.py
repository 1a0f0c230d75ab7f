"""Model summary: parameter and multiply-add counts against published figures."""
import pytest

from allflax.models import summary


@pytest.mark.parametrize('name, image_size, params, multiply_adds', [
    ('vgg19', 224, 143_667_240, 19.63e9),
    ('resnet101', 224, 44_707_176, 7.57e9),
    ('efficientnetv2_b3', 300, 14_467_622, 3.01e9),
])
def test_counts(name, image_size, params, multiply_adds):
    counts = summary.summarize(name, image_size)
    assert counts['params'] == params
    assert counts['multiply_adds'] == pytest.approx(multiply_adds, rel=0.02)


def test_xla_skips_the_products_with_padding():
    counts = summary.summarize('vgg19', 224)
    assert 0.95 * counts['multiply_adds'] < counts['xla_multiply_adds'] < counts['multiply_adds']
