"""Keras's published ImageNet backbone files: where each is, its hash, and the input convention its
weights were trained on; and which of them initialises each registered model. A table only, so that
`imagenet` (fetching) and `keras_weights` (converting, and its CLI) both read it.
"""
import dataclasses

from allflax.data import input_convention


@dataclasses.dataclass(frozen=True)
class WeightFile:
    url: str
    file_hash: str  # md5 (32 hex digits) or sha256 (64), chosen by length as keras.utils.get_file does.
    input_convention: str  # What the weights were trained on (allflax.data.input_convention).

    @property
    def file_name(self) -> str:
        return self.url.rpartition('/')[2]


_KERAS = 'https://storage.googleapis.com/tensorflow/keras-applications/'
# Keras 3.15.1, keras/src/applications/: vgg16.py and vgg19.py (WEIGHTS_PATH_NO_TOP and its
# get_file hash), resnet.py and efficientnet_v2.py (BASE_WEIGHTS_PATH + the notop file name,
# WEIGHTS_HASHES[...][1]). Keyed by the registered name of the backbone. Input conventions, from the same
# Keras files: vgg16/vgg19/resnet's preprocess_input is imagenet_utils' mode='caffe'; EfficientNetV2's
# include_preprocessing layers are Rescaling(1/255) + Normalization(ImageNet mean, std**2) for the B
# variants and Rescaling(1/128, offset=-1) for S (its preprocess_input is the identity).
KERAS_WEIGHTS: dict[str, WeightFile] = {
    'vgg16': WeightFile(_KERAS + 'vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
                        '6d6bbae143d832006294945121d1f1fc', input_convention.CAFFE),
    'vgg19': WeightFile(_KERAS + 'vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5',
                        '253f8cb515780f3b799900260a226db6', input_convention.CAFFE),
    'resnet50': WeightFile(_KERAS + 'resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
                           '4d473c1dd8becc155b73f8504c6f6626', input_convention.CAFFE),
    'resnet101': WeightFile(_KERAS + 'resnet/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5',
                            '88cf7a10940856eca736dc7b7e228a21', input_convention.CAFFE),
    'efficientnetv2_b0': WeightFile(_KERAS + 'efficientnet_v2/efficientnetv2-b0_notop.h5',
                                    '893217f2bb855e2983157299931e43ff', input_convention.IMAGENET_MEAN_STD),
    'efficientnetv2_b1': WeightFile(_KERAS + 'efficientnet_v2/efficientnetv2-b1_notop.h5',
                                    '0e80663031ca32d657f9caa404b6ec37', input_convention.IMAGENET_MEAN_STD),
    'efficientnetv2_b2': WeightFile(_KERAS + 'efficientnet_v2/efficientnetv2-b2_notop.h5',
                                    '1dfe2e7a5d45b6632553a8961ea609eb', input_convention.IMAGENET_MEAN_STD),
    'efficientnetv2_b3': WeightFile(_KERAS + 'efficientnet_v2/efficientnetv2-b3_notop.h5',
                                    'f6abf7b5849ac99a89b50dd3fd532856', input_convention.IMAGENET_MEAN_STD),
    'efficientnetv2_s': WeightFile(_KERAS + 'efficientnet_v2/efficientnetv2-s_notop.h5',
                                   'af0682fb74e8c54910f2d4393339c070', input_convention.MINUS_ONE_TO_ONE),
}
# The paper models: a published backbone under a head (and attention) of their own, whose
# variable paths are the backbone's (tests/test_imagenet.py checks it).
_BACKBONES = {'vgg19_mhsa': 'vgg19', 'efficientnetv2_b3_se': 'efficientnetv2_b3'}


def backbone_of(model_name: str) -> str:
    """The registered backbone whose Keras ImageNet file initialises `model_name`."""
    backbone = _BACKBONES.get(model_name, model_name)
    if backbone not in KERAS_WEIGHTS:
        with_weights = sorted(KERAS_WEIGHTS.keys() | _BACKBONES.keys())
        raise ValueError(f'model {model_name!r} has no published ImageNet weights; models with them: '
                         f'{", ".join(with_weights)}')
    return backbone
