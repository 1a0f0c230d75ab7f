"""Paper 1's VGG19 baseline: Keras's VGG19 with its own top, focal loss, 4 ALL subtypes, 224 px."""
from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(
        model='vgg19', data='synthetic_all4', image_size=224, batch_size=32,
        num_epochs=50, learning_rate=1e-4)
    config.model.options.dropout_rate = 0.5
    return common.apply_args(config, arg)
