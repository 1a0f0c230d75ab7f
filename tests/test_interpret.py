"""Grad-CAM, attention maps and SE gates on toy models whose answers are known."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allflax.evaluation import inference
from allflax.evaluation import interpret
from allflax.models.attention import MultiHeadSelfAttention, SqueezeExcitation


class OnePositionModel(nnx.Module):
    """Features are the image; the logits read the features at one position only."""

    def __init__(self, row, col, weights):
        self.row, self.col = row, col
        self.weights = nnx.Param(jnp.asarray(weights, jnp.float32))

    def features(self, images):
        return images

    def head(self, features):
        return features[:, self.row, self.col, :] @ self.weights[...]


def test_gradcam_peaks_where_the_logit_looks():
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2), minval=0.5, maxval=1.0)
    model = OnePositionModel(5, 2, [[1.0, -1.0], [0.5, -0.5]])  # Class 0 grows with both channels.
    logits, cams = interpret.gradcam(model, images)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), [0, 0, 0])
    # Gradient only at (5, 2), so each channel's weight is its class weight / 64.
    expected = jax.nn.relu((images * jnp.array([1.0, 0.5]) / 64).sum(-1))
    np.testing.assert_allclose(cams, expected, rtol=1e-6)
    # Only the looked-at position matters: an image bright there, dark elsewhere, peaks there.
    spot = jnp.full((1, 8, 8, 2), 0.1).at[0, 5, 2].set(1.0)
    _, cam = interpret.gradcam(model, spot)
    assert np.unravel_index(np.argmax(cam[0]), (8, 8)) == (5, 2)


class AttentionModel(nnx.Module):
    def __init__(self, block, channels, rngs):
        self.attention = block
        self.predictions = nnx.Linear(channels, 3, rngs=rngs)

    def features(self, images):
        return self.attention(images) if isinstance(self.attention, MultiHeadSelfAttention) else images

    def head(self, features):
        if isinstance(self.attention, SqueezeExcitation):
            features = self.attention(features)
        return self.predictions(features.mean(axis=(1, 2)))


def test_attention_map_is_the_mean_softmax_over_heads_and_queries():
    rngs = nnx.Rngs(0)
    block = MultiHeadSelfAttention(16, 9, num_heads=2, dropout_rate=0.0, dtype=jnp.float32,
                                   param_dtype=jnp.float32, rngs=rngs)
    model = AttentionModel(block, 16, rngs)
    model.eval()
    images = jax.random.normal(jax.random.key(1), (2, 3, 3, 16))
    out = interpret.explain(model, images)
    tokens = block.norm(images.reshape(2, 9, 16) + block.position_embedding[...])
    query, key = block.attention.query(tokens), block.attention.key(tokens)
    weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(8), axis=-1)
    np.testing.assert_allclose(out['attention'], weights.mean(axis=(1, 2)).reshape(2, 3, 3), rtol=1e-5)
    np.testing.assert_allclose(out['attention'].sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert out['gradcam'].shape == (2, 3, 3) and 'se_gates' not in out


def test_se_gates_are_the_blocks_channel_weights():
    rngs = nnx.Rngs(0)
    block = SqueezeExcitation(8, 2, kernel_init=nnx.initializers.lecun_normal(), dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=rngs)
    model = AttentionModel(block, 8, rngs)
    images = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
    out = interpret.explain(model, images)
    assert out['se_gates'].shape == (2, 8) and np.all((out['se_gates'] > 0) & (out['se_gates'] < 1))
    np.testing.assert_allclose(out['se_gates'] * 1.0, block.gates(images)[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(block(images), images * block.gates(images), rtol=1e-6)


def test_select_examples_mixes_errors_and_correct_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probabilities = np.eye(3)[[0, 1, 1, 2, 2, 2, 0, 1]] * 0.5 + 0.5 / 3
    probabilities[0, 0] += 0.01  # The more confident correct class-0 prediction comes first.
    chosen = interpret.select_examples(labels, probabilities, 4)
    predicted = probabilities.argmax(1)
    assert (predicted[chosen] != labels[chosen]).sum() == 2  # Both errors, then two correct.
    assert chosen[2] == 0 and labels[chosen[3]] != 0  # Classes take turns.
    assert len(interpret.select_examples(labels, probabilities, 20)) == 8


def test_overlay_and_dihedral_views():
    image = np.zeros((16, 16, 3), np.uint8)
    heat = np.zeros((4, 4)); heat[0, 3] = 1.0  # Top right.
    blended = interpret.overlay(image, heat)
    assert blended.shape == (16, 16, 3)
    assert blended[1, 14, 0] > blended[14, 1, 0] and blended[1, 14, 2] < blended[14, 1, 2]  # Jet: hot is red.
    tiles = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    views = inference.dihedral_views(tiles)
    assert len({v.tobytes() for v in map(np.ascontiguousarray, views)}) == 8
    np.testing.assert_array_equal(views[0], tiles)
    assert any(np.array_equal(v, np.rot90(tiles, axes=(1, 2))) for v in views)


@pytest.mark.parametrize('steps, expected', [(('resize_pad',), [10, 20, 30]), (('resize_pad', 'lab'), None)])
def test_display_rgb_undoes_lab(steps, expected):
    tile = np.full((4, 4, 3), [10, 20, 30], np.uint8)
    if expected is None:
        tile, expected = cv2.cvtColor(tile, cv2.COLOR_RGB2LAB), [10, 20, 30]
    np.testing.assert_allclose(interpret.display_rgb(tile, steps)[0, 0], expected, atol=2)
