"""Model size and cost: parameters and multiply-adds per image.

  python -m allflax.models.summary --model=resnet101 --image_size=224

Two multiply-add counts of the inference forward pass at batch 1:
  multiply_adds: convolution and matrix-product multiply-adds, counting products
    with padding, as papers and Keras-based tools report them (VGG19 at 224:
    19.63 G, ResNet101: 7.57 G, EfficientNetV2-B3 at 300: 3.01 G).
  xla_multiply_adds: XLA's cost analysis of the compiled program, halved. XLA skips
    products with padding (3×3 convolutions on a 14×14 map lose 9 %) and adds the
    elementwise work, so it reads lower: 18.97 G for VGG19.
Nothing is initialised or run: the model is built abstractly, traced and compiled, with every
convolution as XLA's (`ops.portable_only`: on CPU the models compute some convolutions as
elementwise products, dots or Winograd transforms, which would hide or shrink their count).
"""
import math

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.extend import core as jax_core

from allflax import models
from allflax.models import ops


def summarize(name: str, image_size: int, *, num_classes: int = 1000, include_top: bool = True,
              **options) -> dict:
    """{'model', 'image_size', 'params', 'multiply_adds', 'xla_multiply_adds'} for a registered model."""
    model = nnx.eval_shape(lambda: models.create(name, num_classes, include_top=include_top,
                                                 image_size=image_size, **options))
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with ops.portable_only():
        xla_cost = jax.jit(forward).lower(state, images).compile().cost_analysis()
        jaxpr = jax.make_jaxpr(forward)(state, images).jaxpr
    return {'model': name, 'image_size': image_size, 'params': models.count_params(model),
            'multiply_adds': _multiply_adds(jaxpr), 'xla_multiply_adds': xla_cost['flops'] / 2}


def _multiply_adds(jaxpr: jax_core.Jaxpr) -> int:
    """Multiply-adds of every convolution and matrix product, sub-programs included."""
    total = 0
    for equation in jaxpr.eqns:
        output_size = math.prod(equation.outvars[0].aval.shape)
        if equation.primitive.name == 'conv_general_dilated':
            # Each output element takes one product per kernel element of its feature group.
            kernel = equation.invars[1].aval.shape
            output_features = kernel[equation.params['dimension_numbers'].rhs_spec[0]]
            total += output_size * math.prod(kernel) // output_features
        elif equation.primitive.name == 'dot_general':
            (contracting, _), _ = equation.params['dimension_numbers']
            lhs = equation.invars[0].aval.shape
            total += output_size * math.prod(lhs[axis] for axis in contracting)
        repeats = equation.params['length'] if equation.primitive.name == 'scan' else 1
        for value in equation.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax_core.Jaxpr):
                    total += repeats * _multiply_adds(sub)
    return total


def _define_flags():
    flags.DEFINE_string('model', None, 'Registered model name.', required=True)
    flags.DEFINE_integer('image_size', 224, 'Square input size in pixels.')
    flags.DEFINE_integer('num_classes', 1000, 'Classes of the head.')
    flags.DEFINE_boolean('include_top', True, 'Include the classifier head.')


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    options = flags.FLAGS
    summary = summarize(options.model, options.image_size, num_classes=options.num_classes,
                        include_top=options.include_top)
    print(f'{summary["model"]} at {summary["image_size"]}×{summary["image_size"]}: '
          f'{summary["params"]:,} parameters, {summary["multiply_adds"] / 1e9:.2f} G multiply-adds per image '
          f'(XLA: {summary["xla_multiply_adds"] / 1e9:.2f} G)')


if __name__ == '__main__':
    _define_flags()
    app.run(_main)
