"""Bilinear resampling without per-pixel gathers, for TPUs.

The portable resampler (`allflax.data.augment`) gathers the four neighbours of every output
pixel. Compiled for a TPU, such gathers of single pixels dominate EfficientNetV2-B3's train step
(XLA's cost analysis: 6.2 TB per 256-image step on v5e, against 0.1 TB for the network;
benchmarks/RESULTS.md, "Augmentation on TPU"). Here the output is cut into TILE×TILE tiles; each
tile reads one window of the input around its pixels' sources (a gather of whole windows), and
its pixels weigh the window's columns on the matrix unit and then its rows. Exact bilinear
interpolation, black outside, as the portable resampler.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax

TILE = 16  # Output pixels per tile side: 256 per tile fill the vector unit's lanes.


def window_size(max_step: float, max_degrees: float, tile: int = TILE) -> int:
    """Source rows (and columns) a tile's pixels can reach: the span of `tile` outputs, each at
    most `max_step` source pixels from the next along either axis before a turn of up to
    `max_degrees`, and the bilinear neighbour beyond."""
    turn = math.radians(min(abs(max_degrees), 45.0))  # cos + sin peaks at 45°.
    return math.ceil((tile - 1) * max_step * (math.cos(turn) + math.sin(turn))) + 2


def bilinear(images: jax.Array, rows: jax.Array, cols: jax.Array, *, max_step: float,
             max_degrees: float) -> jax.Array:
    """N×H×W×C `images` at fractional source positions `rows`, `cols` (N×H'×W'), black outside,
    for sampling grids that are affine maps of the output grid: steps of at most `max_step`
    source pixels per output pixel along either axis, turned by at most `max_degrees`."""
    window = window_size(max_step, max_degrees)
    return jax.vmap(lambda *args: _bilinear(*args, window))(images, rows, cols)


def _bilinear(image, rows, cols, window: int):
    height, width, channels = image.shape
    out_height, out_width = rows.shape
    tile_rows, tile_cols = -(-out_height // TILE), -(-out_width // TILE)
    pad = ((0, tile_rows * TILE - out_height), (0, tile_cols * TILE - out_width))

    def tiles(positions):  # H'×W' → tile row × tile column × pixel of the tile.
        positions = jnp.pad(positions, pad, mode='edge')
        positions = positions.reshape(tile_rows, TILE, tile_cols, TILE).transpose(0, 2, 1, 3)
        return positions.reshape(tile_rows, tile_cols, TILE * TILE)

    rows, cols = tiles(rows), tiles(cols)
    # A window starts at its tile's lowest source row and column. The zero margin is wide enough
    # that a tile wholly outside the image, whose window start is clipped into the margin, reads
    # only zeros: its pixels are all over one pixel outside, black.
    margin = window + 2
    top = jnp.clip(jnp.floor(rows.min(-1)), -margin, height + margin - window)
    left = jnp.clip(jnp.floor(cols.min(-1)), -margin, width + margin - window)
    padded = jnp.pad(image.transpose(2, 0, 1), ((0, 0), (margin, margin), (margin, margin)))

    def read(top, left):
        return lax.dynamic_slice(padded, (0, top + margin, left + margin), (channels, window, window))

    windows = jax.vmap(jax.vmap(read))(top.astype(jnp.int32), left.astype(jnp.int32))
    taps = jnp.arange(window, dtype=rows.dtype)[:, None]
    # Tent weights: 1 − distance to the source position, within one pixel; pixels in the lanes.
    row_weights = jnp.maximum(0.0, 1.0 - jnp.abs(taps - (rows - top[..., None])[..., None, :]))
    col_weights = jnp.maximum(0.0, 1.0 - jnp.abs(taps - (cols - left[..., None])[..., None, :]))
    # HIGHEST: f32 products, as the gathers' (TPU's default rounds f32 matmul inputs to bf16).
    by_column = jnp.einsum('abcyx,abxp->abcyp', windows, col_weights, precision=lax.Precision.HIGHEST)
    out = (row_weights[:, :, None] * by_column).sum(3)  # tile row, tile column, channel, pixel
    out = out.reshape(tile_rows, tile_cols, channels, TILE, TILE).transpose(0, 3, 1, 4, 2)
    return out.reshape(tile_rows * TILE, tile_cols * TILE, channels)[:out_height, :out_width]
