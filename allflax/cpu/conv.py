"""XLA:CPU's convolutions where it runs them slowly, computed another way; lax.conv_general_dilated's
signature. `allflax.models.ops` calls these when a program is lowered for CPU only.

- dense 3×3, stride 1, SAME, float32, at mid and low resolution with enough channels:
  Winograd F(4, 3) or F(2, 3) — small constant transforms around batched matmuls, fewer
  multiplications than any direct convolution; `_winograd_tile` says where it is used;
- everything else in float32 or bfloat16, where the oneDNN kernels are built
  (allflax/cpu/kernels.py): oneDNN's convolution, forward and both gradients, 1.1–4× XLA:CPU's
  speed per layer in float32 and 2.4–5.5× in bfloat16 (1×1 ones too: level with XLA's dot on
  AVX-512, 1.3–1.7× it on AVX2); bfloat16 computes in float32 where oneDNN has no bfloat16
  kernels for the CPU (AVX2 alone);
- without them: dense 1×1 stride-1 as one dot (1.5× XLA:CPU's 1×1 convolution, forward +
  backward), depthwise k×k ((k, k, 1, C) kernel, C groups, SAME) as k·k shifted multiply-adds
  (XLA:CPU's grouped convolution is 6–40× slower), Winograd in bfloat16 too, and
  `lax.conv_general_dilated` for the rest.

The kernel may arrive in float32 with bfloat16 inputs: oneDNN rounds it within the layout reorder
it does anyway (XLA:CPU's conversions run as scalar loops); every other route casts it itself.

benchmarks/RESULTS.md has the measurements behind each choice.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from allflax.cpu import kernels as cpu_kernels
from allflax.cpu import onednn

# Winograd F(m, 3) (Lavin & Gray 2016): Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A for an (m + 2)² input tile d.
_WINOGRAD = {
    2: dict(BT=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
            G=np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
            AT=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: dict(BT=np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
            G=np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
            AT=np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]], np.float64)),
}
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
    """`lax.conv_general_dilated`, with XLA:CPU's slow cases (NHWC/HWIO, 2-D) computed another way."""
    out_dtype = preferred_element_type or lhs.dtype
    if lhs.dtype == jnp.bfloat16 and out_dtype == lhs.dtype and bfloat16_computes_in_float32():
        return conv_general_dilated(lhs.astype(jnp.float32), rhs.astype(jnp.float32), window_strides, padding,
                                    lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, **kwargs).astype(lhs.dtype)
    plain = (lhs.ndim == 4 and kwargs.get('out_sharding') is None and batch_group_count == 1
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
    route, pads = _route(lhs, rhs, window_strides, padding, feature_group_count, out_dtype) if plain else ('xla', None)
    strides = tuple(window_strides)
    if route == 'onednn':
        # A float32 kernel with bfloat16 inputs is rounded inside oneDNN.
        return onednn.conv(lhs, rhs if rhs.dtype == jnp.float32 else rhs.astype(lhs.dtype), strides, pads,
                           feature_group_count)
    rhs = rhs.astype(lhs.dtype)  # As flax's promote_dtype would have.
    if route == 'pointwise':
        return pointwise_conv(lhs, rhs, precision).astype(out_dtype)
    if route.startswith('winograd'):
        return winograd_conv(lhs, rhs, int(route[-1]), precision).astype(out_dtype)
    if route == 'shifted':
        return shifted_depthwise_conv(lhs, rhs, strides).astype(out_dtype)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type, **kwargs)


def bfloat16_computes_in_float32() -> bool:
    """Whether bfloat16 convolutions here take the float32 routes (bfloat16 in and out): on a CPU
    without bfloat16 arithmetic (AVX2 alone), where the kernels are built but oneDNN has no
    bfloat16 convolutions. A bfloat16 step then runs no faster than a float32 one."""
    return cpu_kernels.available() and not cpu_kernels.bfloat16_convolutions()


def _route(lhs, rhs, strides, padding, groups, out_dtype):
    """How to compute an undilated NHWC/HWIO 2-D convolution, and its explicit (low, high) padding.

    Routes: 'pointwise', 'winograd2' / 'winograd4', 'onednn', 'shifted' or 'xla'.
    """
    strides, taps = tuple(strides), rhs.shape[:2]
    pads = lax.padtype_to_pads(lhs.shape[1:3], taps, strides, padding) if isinstance(padding, str) else padding
    pads = tuple(tuple(pad) for pad in pads)
    same = list(pads) == _same_padding(lhs.shape[1:3], taps, strides)  # The rewrites below pad as XLA's 'SAME'.
    channels = lhs.shape[3]
    depthwise = groups == channels and rhs.shape[2] == 1 and rhs.shape[3] == channels
    onednn_fits = (cpu_kernels.fits(lhs) and out_dtype == lhs.dtype
                   and (lhs.dtype == jnp.float32 or cpu_kernels.bfloat16_convolutions()))
    if same and groups == 1 and taps == (1, 1) and strides == (1, 1) and not onednn_fits:
        return 'pointwise', pads
    # In bfloat16 oneDNN's convolutions run twice as fast as in float32; Winograd's transforms don't gain.
    float32_or_no_onednn = lhs.dtype == jnp.float32 or not onednn_fits
    if same and groups == 1 and taps == (3, 3) and strides == (1, 1) and float32_or_no_onednn:
        tile = _winograd_tile(*lhs.shape[1:])
        if tile:
            return f'winograd{tile}', pads
    if onednn_fits:
        return 'onednn', pads
    return ('shifted' if same and depthwise else 'xla'), pads


def conv_bias_relu(inputs: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
                   padding: str) -> jax.Array:
    """`relu(conv(inputs) + bias)` of a dense NHWC/HWIO convolution (inputs and bias promoted as
    nnx.Conv promotes them); where oneDNN's convolution would run, the bias and the ReLU run inside
    it (forward: no separate pass over the output; backward: the bias gradient comes with the
    kernel gradient instead of XLA's reduction of the output gradient)."""
    route, pads = _route(inputs, kernel, strides, padding, 1, inputs.dtype)
    if route == 'onednn':
        return onednn.conv_bias_relu(inputs, kernel, bias, strides, pads)
    out = conv_general_dilated(inputs, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.nn.relu(out + bias.astype(out.dtype))


def _same_padding(sizes, taps, strides):
    """XLA's 'SAME' padding: total = max((out − 1)·stride + taps − size, 0), low = total // 2."""
    pads = []
    for size, tap, stride in zip(sizes, taps, strides):
        total = max((-(-size // stride) - 1) * stride + tap - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _winograd_tile(height: int, width: int, in_channels: int) -> int:
    """Output tile m of the Winograd F(m, 3) to use for a stride-1 3×3 convolution, or 0 for XLA's.

    Measured on XLA:CPU (benchmarks/RESULTS.md), forward + backward at batch 16: F(4, 3) wins
    1.3–2.1× at 16×16 and 32×32 with ≥ 128 input channels (and at 16×16 with 56), F(2, 3)
    1.3–1.5× at 8×8 with 256–512. It loses at 64×64 (the 2.25× larger transformed
    activations fall out of cache), with few channels (thin matmuls), and at 4×4 (the
    transformed kernel outweighs the activations).
    """
    smaller, pixels = min(height, width), height * width
    if smaller >= 16 and pixels <= 32 * 32 and in_channels >= (128 if pixels > 16 * 16 else 48):
        return 4
    if 8 <= smaller < 16 and in_channels >= 256:
        return 2
    return 0


def pointwise_conv(inputs: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """1×1 stride-1 convolution (NHWC, (1, 1, C, F) kernel) as one dot, accumulated in float32 at least."""
    accumulate = jnp.promote_types(inputs.dtype, jnp.float32)
    kernel = kernel[0, 0].astype(inputs.dtype)
    return lax.dot_general(inputs, kernel, (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=accumulate).astype(inputs.dtype)


def shifted_depthwise_conv(inputs: jax.Array, kernel: jax.Array, strides) -> jax.Array:
    """Depthwise convolution with XLA's 'SAME' padding (low = total // 2) as a sum of strided
    slices times kernel taps, accumulated in float32 at least."""
    pads = _same_padding(inputs.shape[1:3], kernel.shape[:2], strides)
    out_sizes = [-(-size // stride) for size, stride in zip(inputs.shape[1:3], strides)]
    padded = jnp.pad(inputs, [(0, 0), *pads, (0, 0)])
    accumulate = jnp.promote_types(inputs.dtype, jnp.float32)
    batch, channels = inputs.shape[0], inputs.shape[3]
    total = None
    for row in range(kernel.shape[0]):
        for col in range(kernel.shape[1]):
            end = (batch, row + (out_sizes[0] - 1) * strides[0] + 1, col + (out_sizes[1] - 1) * strides[1] + 1,
                   channels)
            tap = lax.slice(padded, (0, row, col, 0), end, (1, *strides, 1)).astype(accumulate)
            term = tap * kernel[row, col, 0].astype(accumulate)
            total = term if total is None else total + term
    return total.astype(inputs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def winograd_conv(inputs: jax.Array, kernel: jax.Array, tile: int = 4, precision=None) -> jax.Array:
    """Stride-1 'SAME' 3×3 convolution (NHWC, HWIO kernel) by Winograd F(tile, 3), tile 2 or 4.

    Transforms run in float32 (at least); the (tile + 2)² batched matmuls take bfloat16
    operands (float32 accumulation) for bfloat16 inputs with F(2, 3) only: F(4, 3)'s
    transforms amplify bfloat16's rounding to ~7 % of the output's scale, so it keeps float32.
    The gradients are Winograd-shaped too (custom VJP): the input gradient is this
    convolution of the output gradient with the flipped kernel, the kernel gradient a matmul
    over tiles in the transformed domain.
    """
    return _winograd_forward(inputs, kernel, tile, precision)[0]


def _combine(terms, coefficients):
    """Σ coefficientᵢ · termᵢ for constant coefficients, skipping zeros and multiplications by ±1."""
    total = None
    for coefficient, term in zip(coefficients, terms):
        if coefficient == 0:
            continue
        term = term if coefficient == 1 else -term if coefficient == -1 else term * float(coefficient)
        total = term if total is None else total + term
    return total


def _strided_combinations(array, matrix, stride, count, axis):
    """Stacks, on a new leading axis, Σₖ matrix[i, k] · array[k + stride·t] (t < count, along `axis`)
    for every row i of `matrix`: a 1-D transform of the (matrix.shape[1])-long windows `stride` apart."""
    taps = [lax.slice_in_dim(array, k, k + (count - 1) * stride + 1, stride=stride, axis=axis)
            for k in range(matrix.shape[1])]
    return jnp.stack([_combine(taps, row) for row in matrix])


def _tile_transform(padded, matrix, stride, tiles_h, tiles_w):
    """[N, H, W, C] → [out², N·tiles_h·tiles_w, C]: M d Mᵀ for every `matrix.shape[1]`-square tile d
    starting at multiples of `stride` (M = `matrix`, shape (out, tile size))."""
    rows = _strided_combinations(padded, matrix, stride, tiles_h, axis=1)  # [out (row), N, th, W, C]
    tiles = _strided_combinations(rows, matrix, stride, tiles_w, axis=3)  # [out (column), out (row), N, th, tw, C]
    return tiles.reshape(matrix.shape[0] ** 2, -1, padded.shape[3])


def _kernel_matrix(G, flip=False):
    """The (a², 9) matrix taking a 3×3 kernel's taps (row-major) to G g Gᵀ, its a × a positions
    column-major as `_tile_transform` stacks them; `flip` reverses the taps first."""
    matrix = np.einsum('rk,cl->crkl', G, G).reshape(G.shape[0] ** 2, 9)
    return matrix[:, ::-1] if flip else matrix


def _kernel_transform(kernel, G, flip=False):
    """(3, 3, I, O) → [a², I, O]: G g Gᵀ per channel pair, as one matmul over the nine taps (as
    stacked slices, `_strided_combinations`, XLA:CPU took up to a fifth of VGG19's step for it)."""
    taps = kernel.reshape(9, -1)
    transformed = lax.dot(jnp.asarray(_kernel_matrix(G, flip), taps.dtype), taps, precision=lax.Precision.HIGHEST)
    return transformed.reshape(-1, *kernel.shape[2:])


def _kernel_transform_transpose(transformed, G):
    """[a², I, O] → (3, 3, I, O): Gᵀ u G, the transpose of `_kernel_transform`."""
    flat = transformed.reshape(transformed.shape[0], -1)
    taps = lax.dot(jnp.asarray(_kernel_matrix(G).T, flat.dtype), flat, precision=lax.Precision.HIGHEST)
    return taps.reshape(3, 3, *transformed.shape[1:])


def _untile(products, AT, batch, tiles_h, tiles_w, height, width):
    """[a², N·tiles, O] → [N, H, W, O]: Aᵀ m A per tile, tiles laid side by side, cropped."""
    m, a = AT.shape
    products = products.reshape(a, a, batch, tiles_h, tiles_w, products.shape[-1])
    # Tile positions are stacked column-major (`_tile_transform` adds the column axis last, in front).
    columns = _strided_combinations(products, AT, 1, 1, axis=0)  # [m, 1, a, N, th, tw, O]
    out = _strided_combinations(columns, AT, 1, 1, axis=2)  # [m (row), m (column), 1, 1, N, th, tw, O]
    out = out.reshape(m, m, batch, tiles_h, tiles_w, -1).transpose(2, 3, 0, 4, 1, 5)  # [N, th, m, tw, m, O]
    return out.reshape(batch, tiles_h * m, tiles_w * m, -1)[:, :height, :width]


def _winograd_forward(inputs, kernel, tile, precision, flip=False):
    """The convolution and the transformed input; `flip` convolves with the kernel that gives the
    input gradient (taps reversed, input and output channels swapped)."""
    BT, G, AT = (_WINOGRAD[tile][name] for name in ('BT', 'G', 'AT'))
    batch, height, width, _ = inputs.shape
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    accumulate = jnp.promote_types(inputs.dtype, jnp.float32)
    operands = inputs.dtype if tile == 2 else accumulate
    padded = jnp.pad(inputs.astype(accumulate),
                     [(0, 0), (1, tiles_h * tile + 1 - height), (1, tiles_w * tile + 1 - width), (0, 0)])
    transformed = _tile_transform(padded, BT, tile, tiles_h, tiles_w).astype(operands)
    kernel = _kernel_transform(kernel.astype(accumulate), G, flip).astype(operands)
    products = lax.dot_general(transformed, kernel, (((2,), (2 if flip else 1,)), ((0,), (0,))),
                               precision=precision, preferred_element_type=accumulate)
    out = _untile(products, AT, batch, tiles_h, tiles_w, height, width).astype(inputs.dtype)
    return out, transformed


def _winograd_fwd(inputs, kernel, tile, precision):
    out, transformed = _winograd_forward(inputs, kernel, tile, precision)
    return out, (transformed, kernel)


def _winograd_bwd(tile, precision, residuals, cotangent):
    transformed, kernel = residuals
    G, AT = _WINOGRAD[tile]['G'], _WINOGRAD[tile]['AT']
    _, height, width, _ = cotangent.shape
    tiles_h, tiles_w = -(-height // tile), -(-width // tile)
    accumulate = jnp.promote_types(cotangent.dtype, jnp.float32)
    # The output, hence its cotangent, has the inputs' shape and dtype but for the channels.
    d_inputs = _winograd_forward(cotangent, kernel, tile, precision, flip=True)[0]
    padded = jnp.pad(cotangent.astype(accumulate), [(0, 0), (0, tiles_h * tile - height), (0, tiles_w * tile - width),
                                                    (0, 0)])
    d_products = _tile_transform(padded, AT.T, tile, tiles_h, tiles_w).astype(transformed.dtype)
    d_kernel = lax.dot_general(transformed, d_products, (((1,), (1,)), ((0,), (0,))), precision=precision,
                               preferred_element_type=accumulate)
    return d_inputs, _kernel_transform_transpose(d_kernel, G).astype(kernel.dtype)


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)
