"""Paper 1: VGG19 + multi-head self-attention, sigmoid focal loss, 4 ALL subtypes at 224 px.

Args (after a colon): `demo` shrinks the run to a few minutes on a 2-core CPU.
  python main.py --config=configs/vgg19_mhsa.py:demo --workdir=runs/vgg19_mhsa_demo
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(
        model='vgg19_mhsa', data='synthetic_all4', image_size=224, batch_size=32,
        num_epochs=50, learning_rate=1e-4)
    config.model.options.attention_heads = 8
    config.model.options.attention_after = 'block5_pool'
    config.model.options.head_hidden = 256
    config.model.options.dropout_rate = 0.5
    return common.apply_args(config, arg)
