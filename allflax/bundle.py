"""A trained model outside the training stack: the bundle `--mode=export` writes, read and run with
ONNX Runtime alone (no JAX, Flax, Orbax, Grain or TensorFlow, no workdir, no config file).

  python -m allflax.bundle --bundle=DIR --input=cells/ --output=preds.csv [--batch_size=32]

A bundle is a folder: model.onnx (+ model.onnx.data, its weights), model.jax (the same function as
StableHLO), MODEL_CARD.md and metadata.json, which holds a SHA-256 of every other file and is checked
against `bundle_schema.json` when written and when read. Images are preprocessed by the code training
used (`allflax.data.preprocess`), and the CSVs are those of `--mode=predict`.
"""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile

import jsonschema
import numpy as np

from allflax.data import image_files, preprocess

SCHEMA_VERSION = 1
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bundle_schema.json')
METADATA = 'metadata.json'
ONNX = 'model.onnx'
STABLEHLO = 'model.jax'
MODEL_CARD = 'MODEL_CARD.md'


class BundleError(ValueError):
    """A bundle that cannot be used as it is, or input it refuses: said in one line."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def validate(metadata: dict, where: str):
    """Raises BundleError unless `metadata` is of this schema version and valid under its schema."""
    version = metadata.get('schema_version') if isinstance(metadata, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f'{where}: schema version {version!r} is not one this allflax reads ({SCHEMA_VERSION}); '
                          f'export the bundle again, or read it with the allflax that wrote it')
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(metadata))
    if error is not None:
        at = '/'.join(map(str, error.absolute_path)) or '(top level)'
        raise BundleError(f'{where}: not a valid bundle metadata.json at {at}: {error.message}')


def is_bundle(directory: str) -> bool:
    """Whether `directory` holds a metadata.json of some bundle (whatever its state)."""
    return os.path.isfile(os.path.join(directory, METADATA))


def read_metadata(directory: str) -> dict:
    """The bundle's metadata, after checking its schema and every file's SHA-256."""
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise BundleError(f'{directory} is not a bundle: it has no {METADATA} (python main.py --mode=export writes one)')
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise BundleError(f'{path} cannot be read as JSON: {error}') from error
    validate(metadata, path)
    for name, digest in metadata['files'].items():
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            raise BundleError(f'{file_path} is missing from the bundle (metadata.json lists it)')
        if sha256(file_path) != digest:
            raise BundleError(f'{file_path} has changed since export: its SHA-256 is not the one metadata.json '
                              f'holds; export the bundle again')
    expected = preprocess.describe([step['name'] for step in metadata['preprocessing']['steps']],
                                   metadata['input']['size'])
    if metadata['preprocessing']['steps'] != expected:
        raise BundleError(f'{path}: its preprocessing is not what this allflax does '
                          f'({json.dumps(expected)}); read it with the allflax that wrote it')
    return metadata


@contextlib.contextmanager
def writing(output: str):
    """Yields a temporary folder beside `output`, renamed to `output` when the block completes (an
    older bundle there is replaced; the folder is removed if the block raises). Refuses, before
    anything is written, an `output` that exists and is neither a bundle nor an empty folder."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not (os.path.isdir(output) and (is_bundle(output) or not os.listdir(output))):
        raise BundleError(f'{output} exists and is not a bundle: name a new folder (or remove it)')
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(output)}.', suffix='.partial')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # As a folder made with os.makedirs: mkdtemp's is private.
    try:
        yield temporary
        previous = None
        if os.path.exists(output):
            previous = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(output)}.', suffix='.old')
            os.replace(output, os.path.join(previous, 'bundle'))
        os.replace(temporary, output)
        if previous:
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def finish(directory: str, metadata: dict, model_card: str):
    """Writes MODEL_CARD.md, then metadata.json with the SHA-256 of every other file of
    `directory`, validated before it is written and read back as a reader will."""
    with open(os.path.join(directory, MODEL_CARD), 'w') as f:
        f.write(model_card)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)  # jax2onnx writes the weights private.
    metadata = dict(metadata, files={name: sha256(os.path.join(directory, name))
                                     for name in sorted(os.listdir(directory)) if name != METADATA})
    validate(metadata, os.path.join(directory, METADATA))
    with open(os.path.join(directory, METADATA), 'w') as f:
        json.dump(metadata, f, indent=1)
    read_metadata(directory)


class Predictor:
    """The bundle's ONNX model in ONNX Runtime, on the CPU."""

    def __init__(self, directory: str):
        import onnxruntime  # Here, so that reading metadata needs no ONNX Runtime.
        self.metadata = read_metadata(directory)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # Errors only: not the shape-inference notes of every load.
        self.session = onnxruntime.InferenceSession(os.path.join(directory, self.metadata['formats']['onnx']['file']),
                                                    options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.classes = tuple(self.metadata['classes'])
        self.size = self.metadata['input']['size']

    def probabilities(self, tiles: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, classes) float32 probabilities of preprocessed uint8 tiles (N, size, size, 3)."""
        tiles = np.asarray(tiles)
        expected = (self.size, self.size, self.metadata['input']['channels'])
        if tiles.ndim != 4 or tiles.shape[1:] != expected or tiles.dtype != np.uint8:
            raise BundleError(f'the bundle takes uint8 tiles of shape (N, {", ".join(map(str, expected))}), '
                              f'preprocessed as its metadata.json says; got {tiles.dtype} {tiles.shape}')
        outputs = [self.session.run(None, {self.input_name: tiles[start:start + batch_size]})[0]
                   for start in range(0, len(tiles), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), np.float32)

    def read_tiles(self, paths: list[str]):
        """`image_files.read_tiles` with the bundle's preprocessing: (tiles, paths, errors)."""
        steps = [step['name'] for step in self.metadata['preprocessing']['steps']]
        return image_files.read_tiles(paths, steps, self.size)


def predict(directory: str, input_pattern: str, output: str, *, batch_size: int = 32) -> dict:
    """`--mode=predict`'s CSVs from the bundle alone: `output` (path, predicted_class, one
    probability column per class) and `<output stem>.errors.csv`."""
    predictor = Predictor(directory)
    tiles, readable, errors = predictor.read_tiles(image_files.list_inputs(input_pattern))
    probabilities = predictor.probabilities(np.stack(tiles) if tiles else np.zeros((0, predictor.size,
                                                                                    predictor.size, 3), np.uint8),
                                            batch_size)
    errors_path = image_files.write_errors(output, errors)
    image_files.write_predictions(output, readable, predictor.classes, probabilities)
    return {'output': output, 'predicted': len(readable), 'unreadable': len(errors), 'errors': errors_path,
            'checkpoint_step': predictor.metadata['source']['checkpoint_step']}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m allflax.bundle', description=__doc__.split('\n\n')[0])
    parser.add_argument('--bundle', required=True, help='the folder --mode=export wrote')
    parser.add_argument('--input', required=True, help='an image file, a folder of images or a glob pattern')
    parser.add_argument('--output', default='predictions.csv', help='the CSV to write')
    parser.add_argument('--batch_size', type=int, default=32, help='images per ONNX Runtime call')
    args = parser.parse_args(argv)
    try:
        summary = predict(args.bundle, args.input, args.output, batch_size=args.batch_size)
    except (BundleError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
