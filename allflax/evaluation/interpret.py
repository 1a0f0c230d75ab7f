"""Where a model looks: Grad-CAM for every model, the self-attention of vgg19_mhsa and the
squeeze-and-excitation gates of efficientnetv2_b3_se.

Grad-CAM is taken at a model's `gradcam_layer` where it names one (VGG: the last convolution),
else on `model.features`. `explain` is one batched forward and backward pass and maps every
class; the host picks the class each figure names, then upsamples and overlays with OpenCV.
"""
import os
import re

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allflax import files
from allflax.models.attention import MultiHeadSelfAttention, SqueezeExcitation

OVERLAY_OPACITY = 0.45  # Of the heat map over the image.
PANEL_SIZE = 160  # Pixels per image in a gallery panel, so 32-px tiles stay legible.


def gradcam_layer(model: nnx.Module) -> str:
    """The layer Grad-CAM is taken at, as the report names it."""
    return getattr(model, 'gradcam_layer', 'the last feature map')


def _gradcam_split(model: nnx.Module):
    """(images → Grad-CAM's feature map, that map → logits)."""
    if hasattr(model, 'gradcam_layer'):
        return model.to_gradcam_layer, model.from_gradcam_layer
    return model.features, model.head


def gradcam(tail, feature_map: jax.Array) -> jax.Array:
    """Class-activation maps (N, classes, h, w) of `feature_map` (N, h, w, C) for every class, where
    `tail(feature_map)` are the logits: the channels weighted by the spatial mean of that class
    logit's gradient, summed, ReLU (Selvaraju et al.)."""
    # Summed over images: each image's logits depend on its own features only (no batch statistics).
    class_logits, backward = jax.vjp(lambda x: tail(x).astype(jnp.float32).sum(axis=0), feature_map)
    maps = []
    for one_hot in jnp.eye(class_logits.shape[0], dtype=class_logits.dtype):
        (gradients,) = backward(one_hot)
        channel_weights = gradients.mean(axis=(1, 2), keepdims=True)
        maps.append(nnx.relu((feature_map * channel_weights).sum(axis=-1)).astype(jnp.float32))
    return jnp.stack(maps, axis=1)


def received_attention(block: MultiHeadSelfAttention, tokens: jax.Array, height: int,
                       width: int) -> jax.Array:
    """How much attention each position of the feature map receives, averaged over heads and
    query positions: (N, h, w). `tokens` are the block's normalised inputs."""
    _, sown = nnx.capture(lambda attention, x: attention(x, sow_weights=True), nnx.Intermediate)(
        block.attention, tokens)
    weights = sown['attention_weights'][0]  # (N, heads, queries, keys)
    return weights.mean(axis=(1, 2)).reshape(-1, height, width).astype(jnp.float32)


def explain(model: nnx.Module, images: jax.Array) -> dict[str, jax.Array]:
    """`gradcam` (N, classes, h, w) for any model with `features`/`head`; plus `attention` (N, h, w)
    for a self-attention block, `se_gates` (N, C) for a squeeze-and-excitation block on the features."""
    to_map, tail = _gradcam_split(model)
    block = getattr(model, 'attention', None)
    out = {}
    if isinstance(block, MultiHeadSelfAttention):
        def forward(model, images):  # The whole pass: the block may come before the map or after it.
            feature_map = to_map(images)
            tail(feature_map)
            return feature_map

        feature_map, captured = nnx.capture(forward, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, images)
        tokens = captured['attention']['norm']['__call__'][0]
        out['attention'] = received_attention(block, tokens, *captured['attention']['__call__'][0].shape[1:3])
    else:
        feature_map = to_map(images)
    if isinstance(block, SqueezeExcitation):
        out['se_gates'] = block.gates(feature_map)[:, 0, 0, :].astype(jnp.float32)
    out['gradcam'] = gradcam(tail, feature_map)
    return out


def select_examples(labels: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` indices: half of them errors where there are enough, the rest correct; in
    each group the most confident first, taking the true classes in turn."""
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)

    def ranked(candidates):
        by_confidence = candidates[np.argsort(-confidence[candidates], kind='stable')]
        turn = np.zeros(len(by_confidence), np.int64)  # Rank within its class.
        for label in np.unique(labels[by_confidence]):
            same = labels[by_confidence] == label
            turn[same] = np.arange(same.sum())
        return by_confidence[np.argsort(turn, kind='stable')]

    wrong, correct = ranked(np.flatnonzero(predicted != labels)), ranked(np.flatnonzero(predicted == labels))
    num_wrong = max(count // 2, count - len(correct))
    return np.concatenate([wrong[:num_wrong], correct[:count - len(wrong[:num_wrong])]])


def display_rgb(tile: np.ndarray, preprocess_steps) -> np.ndarray:
    """The tile as a person should see it: tiles preprocessed to CIELAB are converted back."""
    return cv2.cvtColor(tile, cv2.COLOR_LAB2RGB) if 'lab' in tuple(preprocess_steps) else tile


def scaled_to_max(heatmap: np.ndarray) -> np.ndarray:
    """A map ≥ 0 (Grad-CAM, after its ReLU) over its maximum: 0 stays "no evidence"."""
    heatmap = np.asarray(heatmap, np.float32)
    return heatmap / heatmap.max() if heatmap.max() > 0 else heatmap


def scaled_min_to_max(heatmap: np.ndarray) -> np.ndarray:
    """A map from its minimum (0) to its maximum (1). Attention received sums to 1 over the
    positions, so its floor sits near its maximum: scaled by the maximum alone, it is hot everywhere."""
    heatmap = np.asarray(heatmap, np.float32)
    spread = heatmap.max() - heatmap.min()
    return (heatmap - heatmap.min()) / spread if spread > 0 else np.zeros_like(heatmap)


def panel_maps(explanation: dict[str, np.ndarray], index: int, explained_class: int) -> list[np.ndarray]:
    """The heat maps of image `index`'s panel, each in [0, 1]: Grad-CAM for `explained_class`,
    and the attention received where there is one (the same for every class)."""
    maps = [scaled_to_max(explanation['gradcam'][index, explained_class])]
    if 'attention' in explanation:
        maps.append(scaled_min_to_max(explanation['attention'][index]))
    return maps


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """A heat map in [0, 1] upsampled to the image and blended in as a jet colormap."""
    height, width = image.shape[:2]
    heat = cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colored = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), cv2.COLORMAP_JET),
                           cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - OVERLAY_OPACITY, colored, OVERLAY_OPACITY, 0)


def panel(image: np.ndarray, heatmaps: list[np.ndarray]) -> np.ndarray:
    """The image and its overlays side by side, each PANEL_SIZE pixels (or the tile size if larger)."""
    size = max(PANEL_SIZE, image.shape[0])
    tiles = [image] + [overlay(image, heat) for heat in heatmaps]
    return np.concatenate([cv2.resize(t, (size, size), interpolation=cv2.INTER_CUBIC) for t in tiles], axis=1)


def slug(text: str) -> str:
    """`text` safe in a file name."""
    return re.sub(r'[^A-Za-z0-9]+', '-', text).strip('-')


def write_panels(directory: str, images: list[np.ndarray], explanation: dict[str, np.ndarray],
                 classes: np.ndarray, names: list[str]) -> list[str]:
    """Writes `directory/<name>.png` per image (image | Grad-CAM | attention where there is one),
    Grad-CAM for `classes[i]`: the class its caption or file name gives, from the probabilities
    averaged over the views where there is test-time augmentation (the maps are of the image itself)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, (image, name) in enumerate(zip(images, names)):
        path = os.path.join(directory, f'{name}.png')
        if files.is_writer():
            cv2.imwrite(path, cv2.cvtColor(panel(image, panel_maps(explanation, i, classes[i])), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def example_name(rank: int, true_class: str, predicted_class: str) -> str:
    """File name of a gallery panel: its rank, outcome and classes."""
    outcome = 'correct' if true_class == predicted_class else 'wrong'
    return f'{rank:02d}_{outcome}_true-{slug(true_class)}_pred-{slug(predicted_class)}'
