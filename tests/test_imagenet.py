"""`init_from=imagenet`: download from a loopback server, hash check, one conversion, and the
errors (wrong hash, no server, a cut connection) that leave nothing behind."""
import hashlib
import http.server
import os
import socket
import threading

import h5py
import numpy as np
import pytest
from flax import nnx

from allflax import models
from allflax.models import imagenet, keras_weights, weight_files

VGG19_FILE = imagenet.KERAS_WEIGHTS['vgg19'].file_name
MANUAL_ROUTE = f'python -m {keras_weights.__name__} --model=vgg19 --keras='


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files`, announcing `server.missing_bytes` more than it sends."""

    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body) + self.server.missing_bytes))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    server.files, server.requests, server.missing_bytes = {}, [], 0
    server.url = f'http://127.0.0.1:{server.server_address[1]}/mirror'
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope='module')
def vgg19_notop(tmp_path_factory):
    """Random VGG19 backbone weights in the official file's layout (Keras 1 names, pools listed)."""
    rng = np.random.default_rng(0)
    abstract = nnx.eval_shape(lambda: models.create('vgg19', 1, include_top=False))
    path = tmp_path_factory.mktemp('keras') / VGG19_FILE
    values = {}
    with h5py.File(path, 'w') as file:
        names = ('input_1',) + abstract.layer_names
        file.attrs['layer_names'] = [name.encode() for name in names]
        for name in names:
            group = file.create_group(name)
            if not name.startswith('block') or name.endswith('_pool'):
                group.attrs['weight_names'] = []
                continue
            conv = getattr(abstract, name)
            values[name] = rng.standard_normal(conv.kernel.shape, dtype=np.float32)
            group.attrs['weight_names'] = [f'{name}_W_1:0'.encode(), f'{name}_b_1:0'.encode()]
            group[f'{name}_W_1:0'] = values[name]
            group[f'{name}_b_1:0'] = rng.standard_normal(conv.bias.shape, dtype=np.float32)
    return path.read_bytes(), values


@pytest.fixture
def served_vgg19(server, vgg19_notop, monkeypatch):
    """The generated file on the server, its md5 in the table in place of the real one."""
    body, values = vgg19_notop
    server.files[f'/mirror/{VGG19_FILE}'] = body
    real = imagenet.KERAS_WEIGHTS['vgg19']
    monkeypatch.setitem(imagenet.KERAS_WEIGHTS, 'vgg19', weight_files.WeightFile(real.url, hashlib.md5(body).hexdigest(),
                                                                          real.input_convention))
    return server, values


def assert_left_nothing(cache):
    assert not os.path.exists(cache / 'imagenet')
    assert os.listdir(cache / 'keras') == []


def test_fetches_once_converts_once_and_initialises_the_paper_model(served_vgg19, tmp_path, monkeypatch):
    server, values = served_vgg19
    monkeypatch.setenv(imagenet.BASE_URL_ENV, server.url)
    directory = imagenet.resolve_init_from('imagenet', 'vgg19_mhsa', str(tmp_path))
    assert directory == str(tmp_path / 'imagenet' / 'vgg19')
    assert server.requests == [f'/mirror/{VGG19_FILE}']
    assert os.listdir(tmp_path / 'keras') == [VGG19_FILE] and os.listdir(tmp_path / 'imagenet') == ['vgg19']
    # Converted already: no request, not even for the cached file.
    assert imagenet.imagenet_params('vgg19_mhsa', str(tmp_path)) == directory
    assert len(server.requests) == 1
    assert imagenet.resolve_init_from('/some/params', 'vgg19_mhsa', str(tmp_path)) == '/some/params'
    # Recorded with the converted weights: Keras's caffe convention of its VGG weights, which a run from the
    # directory takes (tests/test_input_convention.py checks it against keras.applications.vgg19).
    assert keras_weights.read_sidecar(directory)['input_convention'] == 'caffe'
    assert imagenet.input_convention_of_run(directory, 'vgg19_mhsa', '') == 'caffe'

    model = nnx.eval_shape(lambda: models.create('vgg19_mhsa', 4, image_size=32))
    report = keras_weights.init_from(model, directory)
    assert len(report.loaded) == 32 and report.unexpected == []
    assert {path.split('/')[0] for path in report.missing} == {'attention', 'head_fc', 'predictions'}
    np.testing.assert_array_equal(model.block5_conv4.kernel[...], values['block5_conv4'])


def test_a_failed_conversion_leaves_no_directory_and_the_next_reuses_the_download(served_vgg19, tmp_path,
                                                                                 monkeypatch):
    server, _ = served_vgg19
    save_params = keras_weights.save_params

    def save_then_fail(*args, **kwargs):
        save_params(*args, **kwargs)
        raise RuntimeError('disk full')

    monkeypatch.setattr(keras_weights, 'save_params', save_then_fail)
    with pytest.raises(RuntimeError, match='disk full'):
        imagenet.imagenet_params('vgg19', str(tmp_path), base_url=server.url)
    assert os.listdir(tmp_path / 'imagenet') == []
    monkeypatch.setattr(keras_weights, 'save_params', save_params)
    directory = imagenet.imagenet_params('vgg19', str(tmp_path), base_url=server.url)
    assert os.listdir(tmp_path / 'imagenet') == ['vgg19'] and len(server.requests) == 1
    assert os.path.exists(os.path.join(directory, keras_weights.SIDECAR))


def test_wrong_hash_names_the_url_and_manual_route_and_keeps_nothing(served_vgg19, tmp_path, monkeypatch):
    server, _ = served_vgg19
    real = imagenet.KERAS_WEIGHTS['vgg19']
    monkeypatch.setitem(imagenet.KERAS_WEIGHTS, 'vgg19', weight_files.WeightFile(real.url, '0' * 32, real.input_convention))
    url = f'{server.url}/{VGG19_FILE}'
    with pytest.raises(imagenet.WeightsUnavailableError, match='the download has hash') as error:
        imagenet.imagenet_params('vgg19_mhsa', str(tmp_path), base_url=server.url)
    assert url in str(error.value) and '0' * 32 in str(error.value) and MANUAL_ROUTE in str(error.value)
    assert_left_nothing(tmp_path)


def test_no_server_names_the_url(vgg19_notop, tmp_path):
    with socket.socket() as unused:
        unused.bind(('127.0.0.1', 0))
        base_url = f'http://127.0.0.1:{unused.getsockname()[1]}'
    with pytest.raises(imagenet.WeightsUnavailableError, match='Connection refused') as error:
        imagenet.imagenet_params('vgg19', str(tmp_path), base_url=base_url)
    assert f'{base_url}/{VGG19_FILE}' in str(error.value) and MANUAL_ROUTE in str(error.value)
    assert_left_nothing(tmp_path)


def test_a_cut_connection_keeps_nothing(served_vgg19, tmp_path):
    server, _ = served_vgg19
    server.missing_bytes = 1000
    with pytest.raises(imagenet.WeightsUnavailableError, match=r'the connection closed after \d+ of \d+ bytes'):
        imagenet.imagenet_params('vgg19', str(tmp_path), base_url=server.url)
    assert_left_nothing(tmp_path)


def test_a_corrupt_cached_file_is_fetched_again_with_sha256(server, tmp_path):
    body = b'weights' * 1000
    server.files['/mirror/small.h5'] = body
    destination = tmp_path / 'small.h5'
    destination.write_bytes(body[:-1])
    path = imagenet.fetch(f'{server.url}/small.h5', hashlib.sha256(body).hexdigest(), str(destination),
                          model='vgg19')
    assert path == str(destination) and destination.read_bytes() == body and len(server.requests) == 1
    imagenet.fetch(f'{server.url}/small.h5', hashlib.sha256(body).hexdigest(), str(destination), model='vgg19')
    assert len(server.requests) == 1 and os.listdir(tmp_path) == ['small.h5']


@pytest.mark.parametrize('model_name', ['vgg19_mhsa', 'efficientnetv2_b3_se'])
def test_paper_models_hold_their_backbones_variables(model_name):
    """Every variable of the notop backbone is restored into the paper model, by path and shape."""
    def variables(name, **options):
        model = nnx.eval_shape(lambda: models.create(name, 2, image_size=224, **options))
        return {path: variable.shape for path, variable in nnx.iter_graph(model)
                if isinstance(variable, (nnx.Param, nnx.BatchStat))}

    backbone = variables(imagenet.backbone_of(model_name), include_top=False)
    model = variables(model_name)
    assert backbone.items() <= model.items()


def test_models_without_published_weights_are_named():
    assert imagenet.backbone_of('efficientnetv2_b3') == 'efficientnetv2_b3'
    with pytest.raises(ValueError, match="model 'vit' has no published ImageNet weights; models with them: "
                                         'efficientnetv2_b0'):
        imagenet.backbone_of('vit')
