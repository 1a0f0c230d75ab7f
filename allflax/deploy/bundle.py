"""A trained model outside the training stack: the bundle `--mode=export` writes, read and run with
ONNX Runtime alone (no JAX, Flax, Orbax, Grain or TensorFlow, no workdir, no config file).

  python BUNDLE/predict.py --input=cells/ --output=preds.csv [--batch_size=32]
  python -m allflax.deploy.bundle --bundle=BUNDLE --input=cells/ --output=preds.csv   (the same, from a checkout)

A bundle is a folder: model.onnx (+ model.onnx.data, its weights), model.jax (the same function as
StableHLO), MODEL_CARD.md, its predictor (predict.py, the modules it imports, requirements.txt:
`write_predictor`) and metadata.json, which holds a SHA-256 of every other file and is checked
against `bundle_schema.json` when written and when read. The predictor is `allflax.deploy.predictor`;
it preprocesses images with the code training used (`allflax.data.preprocess`), and its CSVs are
those of `--mode=predict`.
"""
import ast
import contextlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile

import jsonschema

from allflax import files
from allflax.data import image_files, preprocess
from allflax.deploy import predictor
from allflax.deploy.predictor import METADATA, SCHEMA_VERSION, BundleError, sha256  # noqa: F401 (this module's API)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The checkout.
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bundle_schema.json')
ONNX = 'model.onnx'
STABLEHLO = 'model.jax'
MODEL_CARD = 'MODEL_CARD.md'
PREDICTOR = 'predict.py'
REQUIREMENTS = 'requirements.txt'
# The predictor a bundle carries: allflax's modules, each with its file name in the bundle.
PREDICTOR_MODULES = {predictor: PREDICTOR, files: 'files.py', preprocess: 'preprocess.py',
                     image_files: 'image_files.py'}


def read_metadata(directory: str) -> dict:
    """The bundle's metadata, after checking it against its schema, every file's SHA-256, and its
    preprocessing against this allflax's (`predictor.read_metadata`, with the schema)."""
    return predictor.read_metadata(directory, validate)


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def validate(metadata: dict, where: str):
    """Raises BundleError unless `metadata` is of this schema version and valid under its schema."""
    predictor.check_version(metadata, where)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(metadata))
    if error is not None:
        at = '/'.join(map(str, error.absolute_path)) or '(top level)'
        raise BundleError(f'{where}: not a valid bundle metadata.json at {at}: {error.message}')


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


def _bundled_names() -> set[str]:
    """The names the bundle's modules import each other by (predict.py is imported by none)."""
    return {os.path.splitext(name)[0] for module, name in PREDICTOR_MODULES.items() if module is not predictor}


def _rewrite_import(line: re.Match, relative: str) -> str:
    match = re.fullmatch(r'([ \t]*)from allflax(?:\.\w+)* import ([\w, ]+?)(\s+#.*)?', line.group(0))
    imported = [name.strip() for name in match.group(2).split(',')] if match else []
    if not imported or not set(imported) <= _bundled_names():
        raise RuntimeError(f'{relative} imports what a bundle does not carry ({line.group(0).strip()}): add the '
                           f'module to bundle.PREDICTOR_MODULES, or import it otherwise; no bundle written')
    return f'{match.group(1)}import {", ".join(imported)}{match.group(3) or ""}'


def bundled_source(module, version: str) -> str:
    """`module`'s source as a bundle holds it: a header naming where it came from, then the source
    unchanged but for its `from allflax... import a, b` lines, which become `import a, b` (the
    bundle's own copies). Raises RuntimeError if it would import anything but the standard library,
    the packages of `predictor.REQUIREMENTS` and the bundle's modules."""
    path = inspect.getsourcefile(module)
    relative = os.path.relpath(path, ROOT)
    with open(path) as f:
        source = f.read()
    source = re.sub(r'^[ \t]*(from|import) allflax\b.*$', lambda line: _rewrite_import(line, relative), source,
                    flags=re.M)
    allowed = {*sys.stdlib_module_names, *_bundled_names(), 'numpy', 'cv2', 'onnxruntime'}
    for node in ast.walk(ast.parse(source)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
        refused = [name for name in names if name.split('.')[0] not in allowed]
        if refused:
            raise RuntimeError(f'{relative} imports {", ".join(refused)}, which a bundle\'s predictor does not '
                               f'have (the standard library, {", ".join(predictor.REQUIREMENTS)} and its own '
                               f'modules); no bundle written')
    header = (f'# {PREDICTOR_MODULES[module]} of this bundle: {relative}, written by allflax\'s --mode=export at\n'
              f'# commit {version}: the code of allflax itself, unchanged but for its "from allflax...\n'
              '# import" lines, which import this bundle\'s copies. Do not edit: metadata.json holds its SHA-256,\n'
              '# and predict.py refuses a changed file.\n')
    return header + source


def pinned_requirements() -> list[str]:
    """requirements.txt's pins of what the predictor needs (`predictor.REQUIREMENTS`)."""
    path = os.path.join(ROOT, 'requirements.txt')
    with open(path) as f:
        pins = [re.fullmatch(r'([A-Za-z0-9._-]+)==([\w.+!-]+)', line.split('#')[0].strip()) for line in f]
    versions = {match.group(1).lower().replace('_', '-'): match.group(2) for match in pins if match}
    missing = [name for name in predictor.REQUIREMENTS if name not in versions]
    if missing:
        raise RuntimeError(f'{path} pins no version of {", ".join(missing)}, which a bundle\'s requirements.txt '
                           f'needs; no bundle written')
    return [f'{name}=={versions[name]}' for name in predictor.REQUIREMENTS]


def write_predictor(directory: str, version: str) -> dict:
    """predict.py, the modules it imports and requirements.txt in `directory` (`bundled_source`):
    metadata.json's `predictor` entry."""
    for module, name in PREDICTOR_MODULES.items():
        with open(os.path.join(directory, name), 'w') as f:
            f.write(bundled_source(module, version))
    with open(os.path.join(directory, REQUIREMENTS), 'w') as f:
        f.write(f'# What predict.py needs, as allflax pins it (commit {version}). In a new virtual environment:\n'
                f'#   python -m venv venv && venv/bin/pip install -r requirements.txt\n'
                + ''.join(f'{pin}\n' for pin in pinned_requirements()))
    return {'file': PREDICTOR, 'modules': sorted(name for name in PREDICTOR_MODULES.values() if name != PREDICTOR),
            'requirements': REQUIREMENTS, 'run': f'python {PREDICTOR} --input=cells/ --output=predictions.csv',
            'generated_from': f'allflax {version}: '
                              + ', '.join(os.path.relpath(inspect.getsourcefile(m), ROOT) for m in PREDICTOR_MODULES)}


def finish(directory: str, metadata: dict, model_card: str):
    """Writes the predictor (`write_predictor`), MODEL_CARD.md, then metadata.json with the SHA-256
    of every other file of `directory`, validated before it is written and read back as a reader will."""
    carried = write_predictor(directory, str((metadata.get('versions') or {}).get('allflax', 'unknown')))
    with open(os.path.join(directory, MODEL_CARD), 'w') as f:
        f.write(model_card)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)  # jax2onnx writes the weights private.
    metadata = dict(metadata, predictor=carried,
                    files={name: sha256(os.path.join(directory, name))
                           for name in sorted(os.listdir(directory)) if name != METADATA})
    validate(metadata, os.path.join(directory, METADATA))
    with open(os.path.join(directory, METADATA), 'w') as f:
        json.dump(metadata, f, indent=1)
    read_metadata(directory)


class Predictor(predictor.Predictor):
    """`predictor.Predictor`, with metadata.json checked against its schema too."""

    def __init__(self, directory: str, precision: str | None = None):
        super().__init__(directory, validate, precision)


def predict(directory: str, input_pattern: str, output: str, *, batch_size: int = 32,
            precision: str | None = None) -> dict:
    """`predictor.predict`, with metadata.json checked against its schema too."""
    return predictor.predict(directory, input_pattern, output, batch_size=batch_size, validate=validate,
                             precision=precision)


def main(argv=None):
    """`python -m allflax.deploy.bundle`: the bundle's own predictor (its predict.py), run from this checkout."""
    predictor.main(argv, prog='python -m allflax.deploy.bundle', validate=validate)


if __name__ == '__main__':
    main()
