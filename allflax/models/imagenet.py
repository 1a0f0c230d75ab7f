"""ImageNet weights for `--config.model.init_from=imagenet`: Keras's published backbone files.

The file for a model's backbone (the "notop" file: the head is ours) is downloaded once,
checked against the hash Keras lists, and converted once into a params checkpoint that
`keras_weights.init_from` restores into the model by path and shape. Offline, the error
names the URL and the manual route through the `keras_weights` CLI.

Each file's weights were trained on one input convention (`allflax.data.input_convention`),
recorded here and with the converted weights; a run starting from them takes it as its
`data.input_convention` (`input_convention_of_run`).
"""
import contextlib
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request

from absl import logging
from flax import nnx

from allflax import models
from allflax.data import input_convention
from allflax.models import keras_weights
from allflax.models.weight_files import KERAS_WEIGHTS, backbone_of  # noqa: F401 (imagenet.KERAS_WEIGHTS)

BASE_URL_ENV = 'ALLFLAX_KERAS_WEIGHTS_URL'


class WeightsUnavailableError(RuntimeError):
    """The weight file could not be fetched and verified; the message says how to do it by hand."""


class InputConventionError(ValueError):
    """A run's data.input_convention that its pretrained weights contradict, or cannot be chosen."""


def fetch(url: str, file_hash: str, destination: str, *, model: str, timeout: float = 60) -> str:
    """Downloads `url` to `destination` unless a file with `file_hash` is there already.

    The download streams into a `.partial` file in the same folder, hashed as it comes,
    and only a verified file takes the final name, so an interrupted or corrupt download
    is never used. `model` names the backbone in the error's manual route.
    """
    if os.path.exists(destination):
        if _hash_file(destination, file_hash) == file_hash.lower():
            return destination
        logging.warning('%s does not match hash %s; fetching it again', destination, file_hash)
        os.remove(destination)
    folder = os.path.dirname(os.path.abspath(destination))
    os.makedirs(folder, exist_ok=True)
    # A unique name: processes sharing the cache must not write into one file.
    handle, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(destination) + '.', suffix='.partial')
    logging.info('Fetching %s', url)
    try:
        hasher = _hasher(file_hash)
        with os.fdopen(handle, 'wb') as file, urllib.request.urlopen(url, timeout=timeout) as response:
            received, length = 0, response.headers.get('Content-Length')
            while chunk := response.read(1 << 20):
                hasher.update(chunk)
                file.write(chunk)
                received += len(chunk)
        # http.client returns a short body without an error when the connection drops.
        if length is not None and received != int(length):
            raise WeightsUnavailableError(_unavailable(url, file_hash, model, f'the connection closed after '
                                                       f'{received} of {length} bytes'))
        if hasher.hexdigest() != file_hash.lower():
            raise WeightsUnavailableError(_unavailable(url, file_hash, model,
                                                       f'the download has hash {hasher.hexdigest()}'))
        os.replace(partial, destination)
    except (OSError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors.
        reason = f'{type(error).__name__}: {error}'
        raise WeightsUnavailableError(_unavailable(url, file_hash, model, reason)) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    return destination


def _hasher(file_hash: str):
    return hashlib.sha256() if len(file_hash) == 64 else hashlib.md5()


def _hash_file(path: str, file_hash: str) -> str:
    hasher = _hasher(file_hash)
    with open(path, 'rb') as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _unavailable(url: str, file_hash: str, model: str, reason: str) -> str:
    output = f'weights/{model}'
    return (f'cannot fetch the ImageNet weights {url} ({_hasher(file_hash).name} '
            f'{file_hash}): {reason}.\nDownload the file yourself from {url}, check its hash, convert it with\n'
            f'  python -m {keras_weights.__name__} --model={model} --keras=<downloaded file> --output={output}\n'
            f'and set --config.model.init_from={output}')


def imagenet_params(model_name: str, cache_dir: str, *, base_url: str | None = None) -> str:
    """The directory of converted ImageNet params for `model_name`'s backbone, made once.

    `<cache_dir>/keras/` keeps the downloaded file, `<cache_dir>/imagenet/<backbone>` the
    params; they are converted in a temporary directory renamed into place when complete,
    so a half-converted directory is never taken as valid. `base_url` (else $ALLFLAX_KERAS_WEIGHTS_URL)
    replaces the URL up to the file name: a mirror.
    """
    backbone = backbone_of(model_name)
    converted = os.path.join(os.path.abspath(cache_dir), 'imagenet', backbone)
    if os.path.exists(os.path.join(converted, keras_weights.SIDECAR)):
        return converted
    entry = KERAS_WEIGHTS[backbone]
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    url = f'{base_url.rstrip("/")}/{entry.file_name}' if base_url else entry.url
    path = fetch(url, entry.file_hash, os.path.join(cache_dir, 'keras', entry.file_name), model=backbone)
    # Abstract: every weight comes from the file, so initialising them would be wasted work.
    model = nnx.eval_shape(lambda: models.create(backbone, 1, include_top=False))
    report = keras_weights.load_keras(model, path)
    if report.missing or report.unexpected:
        raise ValueError(f'{path} does not fit {backbone} without its top:\n{report}')
    os.makedirs(os.path.dirname(converted), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(converted), prefix=f'.{backbone}.')
    try:
        keras_weights.save_params(model, staging, model_name=backbone, input_convention=entry.input_convention)
        os.rename(staging, converted)
    except OSError:
        if not os.path.exists(os.path.join(converted, keras_weights.SIDECAR)):
            raise
        # Another process converted it first.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info('Converted %s into %s', path, converted)
    return converted


def resolve_init_from(init_from: str, model_name: str, cache_dir: str) -> str:
    """The params directory to pass to `keras_weights.init_from`: 'imagenet' means the backbone's
    published weights; anything else is already a directory."""
    return imagenet_params(model_name, cache_dir) if init_from == 'imagenet' else init_from


def input_convention_of_run(init_from: str, model_name: str, requested: str) -> str:
    """The input convention a run uses: that of the weights it starts from (`init_from` 'imagenet':
    Keras's file for the backbone, KERAS_WEIGHTS; a directory: its sidecar's record), else
    `requested` (data.input_convention) or, from scratch, imagenet_mean_std. Raises
    InputConventionError where `requested` contradicts the weights', or a directory records none
    and none is requested."""
    if requested and requested not in input_convention.NAMES:
        raise InputConventionError(f'data.input_convention={requested!r} is not a convention: use one of '
                                   f'{", ".join(input_convention.NAMES)}, or \'\' to take that of model.init_from\'s '
                                   f'weights')
    if not init_from:
        return requested or input_convention.IMAGENET_MEAN_STD
    if init_from == 'imagenet':
        backbone = backbone_of(model_name)
        weights, source = KERAS_WEIGHTS[backbone].input_convention, f"Keras's {backbone} ImageNet weights"
    else:
        sidecar = os.path.join(os.path.abspath(init_from), keras_weights.SIDECAR)
        weights = keras_weights.read_sidecar(init_from).get('input_convention')
        source = f'the weights recorded in {sidecar}'
        if weights is None and not requested:
            by_convention = {}
            for backbone, entry in KERAS_WEIGHTS.items():
                by_convention.setdefault(entry.input_convention, []).append(backbone)
            known = '; '.join(f'{name} for {", ".join(backbones)}' for name, backbones in by_convention.items())
            raise InputConventionError(
                f'{sidecar} records no input convention (converted before allflax recorded it): set '
                f'--config.data.input_convention to the one its weights were trained on (Keras\'s ImageNet '
                f'weights: {known}), or convert them again with python -m {keras_weights.__name__}')
    if requested and weights and requested != weights:
        raise InputConventionError(
            f'data.input_convention={requested!r} contradicts model.init_from={init_from!r}: {source} were trained '
            f'on {weights!r} ({input_convention.convention(weights).meaning}); drop --config.data.input_convention '
            f'or set it to {weights!r}')
    return weights or requested
