"""Paper 1's ResNet101 baseline (Keras v1 layout), focal loss, 4 ALL subtypes, 224 px."""
from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(
        model='resnet101', data='synthetic_all4', image_size=224, batch_size=32,
        num_epochs=50, learning_rate=1e-4)
    return common.apply_args(config, arg)
