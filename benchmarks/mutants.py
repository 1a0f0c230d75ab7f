"""Mutation testing (`make mutants`): mutmut mutates each module of MODULES and runs, against each
mutant, that module's own fast tests only; prints each module's kill rate (killed / mutants) with
the mutants that were not killed, and exits non-zero if any module is under --threshold.

  python -m benchmarks.mutants [--jobs=2] [--threshold=85] [metrics splits ...]

mutmut 3 reads its settings from the working directory and keeps its copy of the tree in
./mutants/ there, so each module gets a directory of its own, mutants/<module>/: links to the
tree, the setup.cfg written below, mutmut's copy and run.log. It starts afresh every time: mutmut
keeps a mutant's verdict while its function is unchanged, even after the tests change.
Numbers and the survivors judged equivalent: benchmarks/RESULTS.md, "Mutation testing".
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, 'mutants')

# Module -> its fast tests (seconds, not the minutes of the tests that train a model).
MODULES = {
    'allflax/evaluation/metrics.py': ['tests/test_metrics.py', 'tests/test_stats.py'],
    'allflax/evaluation/stats.py': ['tests/test_stats.py', 'tests/test_intervals.py'],
    'allflax/evaluation/calibration.py': ['tests/test_stats.py', 'tests/test_calibration.py'],
    'allflax/data/splits.py': ['tests/test_splits.py'],
    'allflax/deploy/bundle.py': ['tests/test_bundle.py'],
    'allflax/deploy/predictor.py': ['tests/test_bundle.py'],
    'allflax/training/workdir_lock.py': ['tests/test_run_guard.py', 'tests/test_outputs.py'],
    'allflax/training/resume_check.py': ['tests/test_run_guard.py', 'tests/test_outputs.py'],
    'allflax/training/config_check.py': ['tests/test_run_guard.py', 'tests/test_configs.py'],
}
# What the tests import or read besides allflax/ and tests/: the recipes (conftest.py), pytest's settings.
ALSO_COPY = ['configs', 'pytest.ini']


def _name(module: str) -> str:
    return os.path.splitext(os.path.basename(module))[0]


class MutmutError(RuntimeError):
    pass


def _ignore_hangups():
    # A mutant of workdir_lock's liveness probe, os.kill(pid, 0) -> os.kill(pid, 1), sends SIGHUP to
    # the lock holder its test names, the test's parent: mutmut itself.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _mutmut(*args: str, cwd: str, log=None) -> str:
    mutmut = os.path.join(os.path.dirname(sys.executable), 'mutmut')
    result = subprocess.run([mutmut, *args], cwd=cwd, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=_ignore_hangups)
    if result.returncode:
        raise MutmutError(f'mutmut {" ".join(args)} failed (exit {result.returncode}): see {cwd}/run.log')
    return result.stdout


def _prepare(module: str, tests: list[str]) -> str:
    directory = os.path.join(WORK, _name(module))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for path in ['allflax', 'tests', *ALSO_COPY]:
        os.symlink(os.path.join(ROOT, path), os.path.join(directory, path))
    lines = ['[mutmut]', 'source_paths=allflax', f'only_mutate={module}',
             'pytest_add_cli_args_test_selection=', *(f'    {t}' for t in tests),
             'also_copy=', *(f'    {p}' for p in ALSO_COPY),
             # Git would report every file changed in the checkout; the directory starts afresh anyway.
             'use_git_change_detection=false']
    with open(os.path.join(directory, 'setup.cfg'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return directory


# One process for all of a module's mutants (`mutmut show` is one a process): each mutated line.
_SHOW = """
import sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
for key in sys.argv[1:]:
    diff = get_diff_for_mutant(key, path=find_mutant(key).path).splitlines()
    line = next((l[1:].strip() for l in diff if l.startswith('+') and not l.startswith('+++')), '?')
    print(key, line, sep='\\t')
"""


def run(module: str, tests: list[str], jobs: int) -> dict:
    directory = _prepare(module, tests)
    start = time.monotonic()
    with open(os.path.join(directory, 'run.log'), 'w') as log:
        _mutmut('run', f'--max-children={jobs}', cwd=directory, log=log)
    seconds = time.monotonic() - start
    status = {}
    for line in _mutmut('results', '--all=true', cwd=directory).splitlines():
        key, _, verdict = line.strip().rpartition(': ')
        if key:
            status[key] = verdict
    not_killed = {key: verdict for key, verdict in status.items() if verdict != 'killed'}
    shown = subprocess.run([sys.executable, '-c', _SHOW, *not_killed], cwd=directory, check=True,
                           stdout=subprocess.PIPE, text=True).stdout
    changes = dict(line.split('\t', 1) for line in shown.splitlines())
    return {'module': module, 'total': len(status), 'killed': len(status) - len(not_killed),
            'not_killed': not_killed, 'changes': changes, 'seconds': seconds}


def _order(key: str):
    function, _, number = key.rpartition('_')
    return function, int(number) if number.isdigit() else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('modules', nargs='*', help='module names (metrics, splits, ...); all when none')
    parser.add_argument('--jobs', type=int, default=os.cpu_count(), help='mutants tested at once')
    parser.add_argument('--threshold', type=float, default=85.0, help='lowest kill rate passed, in %%')
    args = parser.parse_args()
    unknown = set(args.modules) - {_name(m) for m in MODULES}
    if unknown:
        parser.error(f'unknown modules {sorted(unknown)}; known: {[_name(m) for m in MODULES]}')
    summary, failed = [], []
    for module, tests in MODULES.items():
        if args.modules and _name(module) not in args.modules:
            continue
        if not tests:
            summary.append(f'{module}: not measured, no fast tests')
            failed.append(module)
            continue
        print(f'{module}: against {" ".join(tests)}', flush=True)
        try:
            r = run(module, tests, args.jobs)
        except MutmutError as error:
            summary.append(f'{module}: not measured, {error}')
            failed.append(module)
            continue
        for key in sorted(r['not_killed'], key=_order):
            print(f'  {r["not_killed"][key]}: {key.rpartition(".")[2]}: {r["changes"].get(key, "?")}', flush=True)
        rate = 100 * r['killed'] / r['total'] if r['total'] else 0.0
        verdicts = list(r['not_killed'].values())
        others = ', '.join(f'{verdicts.count(v)} {v}' for v in sorted(set(verdicts)))
        summary.append(f'{module}: {r["killed"]}/{r["total"]} = {rate:.1f} %{f" ({others})" if others else ""}, '
                       f'{r["seconds"]:.0f} s')
        if rate < args.threshold:
            failed.append(module)
    print('\nkill rate (killed / mutants), time:', *summary, sep='\n  ')
    if failed:
        raise SystemExit(f'under {args.threshold:g} % or not measured: {", ".join(failed)}')


if __name__ == '__main__':
    main()
