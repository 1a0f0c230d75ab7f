"""Grad-CAM, attention maps and SE gates on toy models whose answers are known, and on VGG19+MHSA
against a hand computation."""
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allflax import models
from allflax.data.dataset import Split
from allflax.evaluation import calibration, inference, interpret, report
from allflax.models import vgg
from allflax.models.attention import MultiHeadSelfAttention, SqueezeExcitation


def with_numpy_weights(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """`model` (without batch norm), built by nnx.eval_shape, given weights drawn by numpy, scaled by
    fan-in, in eval mode: JAX's initialisers compile once per parameter shape, a third of a second each here."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)  # Dropout's, never drawn in eval mode.
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        scale = np.sqrt(2 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return (rng.normal(size=leaf.shape) * scale).astype(leaf.dtype)

    nnx.update(model, jax.tree.map(draw, nnx.state(model)))
    model.eval()
    return model


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
    images = np.random.default_rng(0).uniform(0.5, 1.0, (3, 8, 8, 2)).astype(np.float32)
    model = OnePositionModel(5, 2, [[1.0, -1.0], [0.5, -0.5]])  # Class 0 grows with both channels.
    spot = np.full((1, 8, 8, 2), 0.1, np.float32)
    spot[0, 5, 2] = 1.0
    cams, cam = jax.jit(lambda images, spot: (interpret.gradcam(model.head, images),
                                              interpret.gradcam(model.head, spot)))(images, spot)
    assert cams.shape == (3, 2, 8, 8)
    # Gradient only at (5, 2), so each channel's weight is its class weight / 64.
    expected = np.maximum((images * np.array([1.0, 0.5]) / 64).sum(-1), 0)
    np.testing.assert_allclose(cams[:, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(cams[:, 1], 0)  # Class 1's evidence is negative everywhere.
    # Only the looked-at position matters: an image bright there, dark elsewhere, peaks there.
    assert np.unravel_index(np.argmax(cam[0, 0]), (8, 8)) == (5, 2)


def test_vgg_gradcam_is_taken_at_the_last_convolution():
    """At 224 px, 14×14 (H/16): block5_conv4, before block5_pool and the attention block."""
    model = nnx.eval_shape(lambda: models.create('vgg19_mhsa', 4, image_size=224))
    model.eval()
    out = nnx.eval_shape(interpret.explain, model, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out['gradcam'].shape == (2, 4, 14, 14) and out['attention'].shape == (2, 7, 7)
    assert interpret.gradcam_layer(model) == 'block5_conv4'
    assert interpret.gradcam_layer(nnx.eval_shape(lambda: models.create('vgg16', 4))) == 'block5_conv3'


def test_vgg_gradcam_equals_the_hand_computation(monkeypatch):
    """The gradient of each class logit w.r.t. block5_conv4's output, taken by jax.grad through the
    model's own forward pass, averaged per channel, weighting the map, summed, ReLU."""
    monkeypatch.setattr(vgg, 'WIDTHS', (4, 4, 8, 8, 16))  # VGG19's layers, narrow.
    model = with_numpy_weights(nnx.eval_shape(lambda: models.create('vgg19_mhsa', 3, image_size=64,
                                                                     attention_heads=2)))
    images = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    out = nnx.jit(interpret.explain)(model, images)
    assert out['gradcam'].shape == (2, 3, 4, 4) and out['attention'].shape == (2, 2, 2)

    # block5_conv4's output (after its ReLU) on its way into block5_pool, the only pool of a 4×4
    # map: recorded, and shifted by `delta` to take the logits' gradient with respect to it.
    pool, tap = vgg.max_pool_2x2, {}

    def tapped_pool(x):
        if x.shape[1] == 4:
            tap['map'], x = x, x + tap['delta']
        return pool(x)

    monkeypatch.setattr(vgg, 'max_pool_2x2', tapped_pool)

    @jax.jit
    def gradient_and_map(delta, chosen_class):
        def class_logit(delta):
            tap['delta'] = delta
            return model(images)[:, chosen_class].sum(), tap['map']  # Images are independent: summed.
        return jax.grad(class_logit, has_aux=True)(delta)

    for chosen_class in range(3):
        gradients, feature_map = gradient_and_map(np.zeros((2, 4, 4, 16), np.float32), chosen_class)
        weights = np.asarray(gradients).mean(axis=(1, 2), keepdims=True)
        expected = np.maximum((np.asarray(feature_map) * weights).sum(axis=-1), 0)
        assert expected.max() > 0
        np.testing.assert_allclose(out['gradcam'][:, chosen_class], expected, rtol=1e-4, atol=1e-6 * expected.max())


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


def _attention_model(block_type, channels, **options):
    def build():
        rngs = nnx.Rngs(0)
        block = block_type(channels, **options, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        return AttentionModel(block, channels, rngs)
    return with_numpy_weights(nnx.eval_shape(build))


def test_attention_map_is_the_mean_softmax_over_heads_and_queries():
    model = _attention_model(MultiHeadSelfAttention, 16, num_tokens=9, num_heads=2, dropout_rate=0.0)
    images = np.random.default_rng(1).normal(size=(2, 3, 3, 16)).astype(np.float32)
    out = nnx.jit(interpret.explain)(model, images)
    block = model.attention
    tokens = images.reshape(2, 9, 16) + np.asarray(block.position_embedding[...])
    tokens = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
    tokens = tokens * np.asarray(block.norm.scale[...]) + np.asarray(block.norm.bias[...])
    query, key = (np.einsum('btc,chd->bthd', tokens, np.asarray(dense.kernel[...])) + np.asarray(dense.bias[...])
                  for dense in (block.attention.query, block.attention.key))
    logits = np.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out['attention'], weights.mean(axis=(1, 2)).reshape(2, 3, 3), rtol=1e-5)
    np.testing.assert_allclose(out['attention'].sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert out['gradcam'].shape == (2, 3, 3, 3) and 'se_gates' not in out


def test_se_gates_are_the_blocks_channel_weights():
    model = _attention_model(SqueezeExcitation, 8, squeeze_channels=2, kernel_init=nnx.initializers.lecun_normal())
    images = np.random.default_rng(2).normal(size=(2, 4, 4, 8)).astype(np.float32)
    out, gates, gated = nnx.jit(lambda model, images: (interpret.explain(model, images), model.attention.gates(images),
                                                       model.attention(images)))(model, images)
    assert out['se_gates'].shape == (2, 8) and np.all((out['se_gates'] > 0) & (out['se_gates'] < 1))
    np.testing.assert_allclose(out['se_gates'], gates[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(gated, images * gates, rtol=1e-6)


def test_panels_scale_gradcam_to_its_maximum_and_attention_from_its_minimum():
    rng = np.random.default_rng(4)
    attention = rng.dirichlet(np.full(49, 400.0), size=2).reshape(2, 7, 7)  # Each sums to 1 ...
    assert attention[1].min() > 0.6 * attention[1].max()  # ... so its floor is high.
    gradcam = rng.uniform(size=(2, 3, 14, 14))
    gradcam_map, attention_map = interpret.panel_maps({'gradcam': gradcam, 'attention': attention}, 1, 2)
    np.testing.assert_allclose(gradcam_map, gradcam[1, 2] / gradcam[1, 2].max(), rtol=1e-6)
    low, high = attention[1].min(), attention[1].max()
    np.testing.assert_allclose(attention_map, (attention[1] - low) / (high - low), rtol=1e-5, atol=1e-6)
    assert interpret.panel_maps({'gradcam': gradcam}, 0, 0)[0].max() == 1
    np.testing.assert_array_equal(interpret.scaled_min_to_max(np.full((7, 7), 1 / 49)), 0)  # Flat: nothing shown.


def test_gallery_explains_the_class_of_the_averaged_views(tmp_path):
    """With test-time augmentation, the panel's Grad-CAM is for the class its caption and file name
    give, the argmax of the probabilities averaged over the 8 views, where the image's own view disagrees."""
    model = OnePositionModel(1, 2, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # Logit k: channel k at (1, 2).
    tiles = np.zeros((1, 8, 8, 3), np.uint8)
    tiles[..., 1] = 30  # Class 1 everywhere ...
    tiles[0, 1, 2] = [30, 0, 0]  # ... but class 0 where the image's own view looks.
    logits = nnx.jit(lambda model, tiles: model.head(model.features(tiles.astype(jnp.float32) / 10)))
    view_logits = np.stack([logits(model, view) for view in inference.dihedral_views(tiles)], axis=1)
    probabilities = calibration.probabilities(view_logits)
    assert view_logits[0, 0].argmax() == 0 and probabilities[0].argmax() == 1

    def explain(split):
        out = nnx.jit(lambda model, tiles: interpret.explain(model, tiles.astype(jnp.float32) / 10))(
            model, split.images)
        return {**jax.tree.map(np.asarray, out), 'gradcam_layer': 'features'}

    entries, explanation = report.write_gallery(str(tmp_path), Split(tiles, np.array([0]), np.array(['p'])),
                                                ('a', 'b'), probabilities, explain, count=1, preprocess=())
    (name,) = os.listdir(tmp_path / 'gradcam')
    assert name.endswith('_pred-b.png') and 'predicted b' in entries[0]['caption']
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / 'gradcam' / name)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(drawn, interpret.panel(tiles[0], interpret.panel_maps(explanation, 0, 1)))
    assert not np.array_equal(drawn, interpret.panel(tiles[0], interpret.panel_maps(explanation, 0, 0)))


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
