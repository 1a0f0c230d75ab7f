"""The predictor every bundle carries (its predict.py): `--mode=predict`'s CSVs from the bundle's
folder alone, with the standard library, NumPy, OpenCV and ONNX Runtime (no allflax, JAX or checkout).

  python -m venv venv && venv/bin/pip install -r BUNDLE/requirements.txt
  venv/bin/python BUNDLE/predict.py --input=cells/ --output=preds.csv [--batch_size=32]

`--mode=export` copies this module into the bundle as predict.py, beside the modules it imports
(`bundle.PREDICTOR_MODULES`: files.py, data/preprocess.py, data/image_files.py), each unchanged
but for its `from allflax... import` lines, so the bundle preprocesses with the code training
does. `python -m allflax.deploy.bundle --bundle=BUNDLE` runs this module in place. Before predicting it
checks the schema version and every file's SHA-256 against metadata.json, and refuses a changed or
missing file by name (as predict.py, its own modules before it imports them).
"""
import argparse
import hashlib
import json
import os
import sys

SCHEMA_VERSION = 1
METADATA = 'metadata.json'
# What the predictor imports besides the standard library: a bundle's requirements.txt pins these.
REQUIREMENTS = ('numpy', 'opencv-python-headless', 'onnxruntime')


class BundleError(ValueError):
    """A bundle that cannot be used as it is, or input it refuses: said in one line."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_version(metadata, where: str):
    """Raises BundleError unless `metadata` is of the schema version this predictor reads."""
    version = metadata.get('schema_version') if isinstance(metadata, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f'{where}: schema version {version!r} is not one this allflax reads ({SCHEMA_VERSION}); '
                          f'export the bundle again, or read it with the allflax that wrote it')


# The fields prediction reads, and their types: checked where metadata.json is not checked against
# its JSON schema (a bundle's predict.py has no jsonschema).
READ_FIELDS = (('files', dict), ('classes', list), ('input', 'size', int), ('input', 'channels', int),
               ('preprocessing', 'steps', list), ('formats', 'onnx', 'file', str),
               ('source', 'checkpoint_step', int))


def _check_fields(metadata: dict, where: str):
    for *keys, kind in READ_FIELDS:
        value = metadata
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind):
            raise BundleError(f'{where}: not a valid bundle metadata.json at {"/".join(keys)}: expected a '
                              f'{kind.__name__}; export the bundle again')


def load_metadata(directory: str, validate=None) -> dict:
    """metadata.json of the bundle in `directory`, of this schema version (and, given
    `validate(metadata, where)`, valid under its schema), with the fields prediction reads."""
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise BundleError(f'{directory} is not a bundle: it has no {METADATA} '
                          f'(python main.py --mode=export writes one)')
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise BundleError(f'{path} cannot be read as JSON: {error}') from error
    check_version(metadata, path)
    if validate is not None:
        validate(metadata, path)
    _check_fields(metadata, path)
    return metadata


def check_files(directory: str, metadata: dict, names=None):
    """Raises BundleError naming the first of `names` (by default every file metadata.json lists)
    that is missing or whose SHA-256 is not the one metadata.json holds."""
    for name in metadata['files'] if names is None else names:
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            raise BundleError(f'{file_path} is missing from the bundle (metadata.json lists it)')
        if sha256(file_path) != metadata['files'][name]:
            raise BundleError(f'{file_path} has changed since export: its SHA-256 is not the one metadata.json '
                              f'holds; export the bundle again')


if __name__ == '__main__':  # A bundle's predict.py: its own modules are checked before they are imported,
    sys.dont_write_bytecode = True  # and its folder keeps only its listed files (no __pycache__).
    try:
        _metadata = load_metadata(os.path.dirname(os.path.abspath(__file__)))
        check_files(os.path.dirname(os.path.abspath(__file__)), _metadata,
                    [name for name in _metadata['files'] if name.endswith('.py')])
    except BundleError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)

import numpy as np  # noqa: E402

from allflax import files  # noqa: E402
from allflax.data import image_files, preprocess  # noqa: E402


def read_metadata(directory: str, validate=None) -> dict:
    """The bundle's metadata (`load_metadata`), after checking every file's SHA-256 and that its
    preprocessing is this code's."""
    metadata = load_metadata(directory, validate)
    check_files(directory, metadata)
    path = os.path.join(directory, METADATA)
    try:
        expected = preprocess.describe([step.get('name') if isinstance(step, dict) else None
                                        for step in metadata['preprocessing']['steps']], metadata['input']['size'])
    except ValueError as error:
        raise BundleError(f'{path}: its preprocessing cannot be read: {error}') from error
    if metadata['preprocessing']['steps'] != expected:
        raise BundleError(f'{path}: its preprocessing is not what this allflax does '
                          f'({json.dumps(expected)}); read it with the allflax that wrote it')
    return metadata


def session_options(onnxruntime):
    """ONNX Runtime's options for the bundle's model on the CPU: all graph optimisations, one thread
    per physical core (its defaults; benchmarks/RESULTS.md, bundles, has what else was tried)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # Errors only: not the shape-inference notes of every load.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


PRECISIONS = ('int8', 'float32')


def precision_of(metadata: dict, requested: str | None, directory: str) -> str:
    """The model to run: `requested`, else int8 where the bundle has it (export --int8), else float32."""
    has_int8 = 'onnx_int8' in metadata['formats']
    if requested is None:
        return 'int8' if has_int8 else 'float32'
    if requested not in PRECISIONS:
        raise BundleError(f'--precision={requested}: give one of {", ".join(PRECISIONS)}')
    if requested == 'int8' and not has_int8:
        raise BundleError(f'{directory} holds no int8 model (it was exported without --int8): use '
                          f'--precision=float32, or export it again with --int8')
    return requested


class Predictor:
    """The bundle's ONNX model in ONNX Runtime, on the CPU."""

    def __init__(self, directory: str, validate=None, precision: str | None = None):
        import onnxruntime  # Here, so that reading metadata needs no ONNX Runtime.
        self.metadata = read_metadata(directory, validate)
        self.precision = precision_of(self.metadata, precision, directory)
        model = self.metadata['formats']['onnx_int8' if self.precision == 'int8' else 'onnx']['file']
        self.session = onnxruntime.InferenceSession(os.path.join(directory, model), session_options(onnxruntime),
                                                    providers=['CPUExecutionProvider'])
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


def predict(directory: str, input_pattern: str, output: str, *, batch_size: int = 32, validate=None,
            precision: str | None = None) -> dict:
    """`--mode=predict`'s CSVs from the bundle alone: `output` (path, predicted_class, one
    probability column per class, decision_rule) and `<output stem>.errors.csv`. `precision`:
    `precision_of`."""
    predictor = Predictor(directory, validate, precision)
    image_files.check_outputs(output)
    tiles, readable, errors = predictor.read_tiles(image_files.list_inputs(input_pattern))
    probabilities = predictor.probabilities(np.stack(tiles) if tiles else np.zeros((0, predictor.size,
                                                                                    predictor.size, 3), np.uint8),
                                            batch_size)
    errors_path = image_files.write_errors(output, errors)
    image_files.write_predictions(output, readable, predictor.classes, probabilities,
                                  predictor.metadata.get('decision_rule'))
    return {'output': output, 'predicted': len(readable), 'unreadable': len(errors), 'errors': errors_path,
            'checkpoint_step': predictor.metadata['source']['checkpoint_step'], 'precision': predictor.precision}


def main(argv=None, *, bundle: str | None = None, prog: str | None = None, validate=None):
    """The command line: of the bundle in `bundle` (a bundle's predict.py), else of the one --bundle names."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
    if bundle is None:
        parser.add_argument('--bundle', required=True, help='the folder --mode=export wrote')
    parser.add_argument('--input', required=True, help='an image file, a folder of images or a glob pattern')
    parser.add_argument('--output', default='predictions.csv', help='the CSV to write')
    parser.add_argument('--batch_size', type=int, default=32, help='images per ONNX Runtime call')
    parser.add_argument('--precision', default=None,
                        help='int8 or float32: the model to run (default: int8 where the bundle has one, else float32)')
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise BundleError(f'--batch_size={args.batch_size}: give 1 or more images per ONNX Runtime call')
        summary = predict(bundle or args.bundle, args.input, args.output, batch_size=args.batch_size,
                          validate=validate, precision=args.precision)
    except (BundleError, FileNotFoundError, files.OutputRefused) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == '__main__':  # As a bundle's predict.py: the bundle is the folder this file is in.
    main(bundle=os.path.dirname(os.path.abspath(__file__)), prog='predict.py')
