"""Paper 2's VGG16 baseline: Keras's VGG16 with its own top, focal loss, ALL vs hem, 224 px."""
from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(
        model='vgg16', data='synthetic_cnmc', image_size=224, batch_size=32,
        num_epochs=30, learning_rate=1e-4)
    config.model.options.dropout_rate = 0.5
    return common.apply_args(config, arg)
