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

from allflax import files
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


def check_replaceable(output: str, workdir: str | None = None):
    """Raises files.OutputRefused, saying why, unless `output` is absent, an empty folder, or a bundle
    that export wrote: a folder holding a metadata.json of a bundle's, valid under the schema of its
    version, and no file or folder it does not list (no links). With `workdir`, an `output` that is
    the run's workdir, holds it, or lies in its checkpoints or evaluation is refused too."""
    def refuse(why: str):
        raise files.OutputRefused(f'{output} {why}: export writes a bundle only into a new or empty folder, or '
                                  f'over a bundle it wrote; name another --output')

    if os.path.islink(output):
        refuse('is a symbolic link')
    if workdir is not None:
        run, real = os.path.realpath(workdir), os.path.realpath(output)
        if _within(run, real):
            refuse(f'is or holds the run\'s workdir {workdir}')
        if any(_within(real, os.path.join(run, owned)) for owned in ('checkpoints', 'eval')):
            refuse(f'lies in the checkpoints or evaluation of the run {workdir}')
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        refuse('exists and is not a folder')
    names = set(os.listdir(output))
    if not names:
        return
    if METADATA not in names:
        refuse(f'exists and is not a bundle (it holds files and no {METADATA})')
    try:
        with open(os.path.join(output, METADATA)) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        refuse(f'exists and is not a bundle (its {METADATA} is not JSON: {error})')
    listed = metadata.get('files') if isinstance(metadata, dict) else None
    version = metadata.get('schema_version') if isinstance(metadata, dict) else None
    if not (isinstance(listed, dict) and type(version) is int and 1 <= version <= SCHEMA_VERSION):
        refuse(f'exists and is not a bundle (its {METADATA} has no file list, or no schema version up to '
               f'{SCHEMA_VERSION})')
    if version == SCHEMA_VERSION:
        try:
            validate(metadata, os.path.join(output, METADATA))
        except BundleError as error:
            refuse(f'exists and is not a bundle (its {METADATA} is not valid: {error})')
    unlisted = sorted(names - set(listed) - {METADATA})
    if unlisted:
        refuse(f'holds files that its {METADATA} does not list ({", ".join(unlisted[:5])})')
    linked = sorted(name for name in names if os.path.islink(os.path.join(output, name))
                    or not os.path.isfile(os.path.join(output, name)))
    if linked:
        refuse(f'holds links or folders, which no bundle has ({", ".join(linked[:5])})')


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def writing(output: str, workdir: str | None = None):
    """Yields a temporary folder beside `output`, renamed to `output` when the block completes (a
    bundle export wrote there before is replaced; the folder is removed if the block raises).
    `check_replaceable` refuses, before anything is written, an `output` export must not replace."""
    check_replaceable(output, workdir)
    output = os.path.abspath(output)
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
    image_files.check_outputs(output)
    predictor = Predictor(directory)
    tiles, readable, errors = predictor.read_tiles(image_files.list_inputs(input_pattern))
    probabilities = predictor.probabilities(np.stack(tiles) if tiles else np.zeros((0, predictor.size,
                                                                                    predictor.size, 3), np.uint8),
                                            batch_size)
    errors_path = image_files.write_errors(output, errors)
    image_files.write_predictions(output, readable, predictor.classes, probabilities,
                                  predictor.metadata.get('decision_rule'))
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
    except (BundleError, FileNotFoundError, files.OutputRefused) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
