"""Fields of the JSON lines the benchmarks print, and the timing protocol `benchmarks.peers`
drives its workers with, without importing JAX or any other framework: a peer worker
(`benchmarks.peer_step`) loads only the framework it measures."""
import json
import sys
from collections.abc import Callable
from importlib import metadata

import numpy as np


def summary(values: list[float], digits: int = 4) -> dict:
    """Median and spread of repeated measurements."""
    return {'median': round(float(np.median(values)), digits), 'min': round(min(values), digits),
            'max': round(max(values), digits), 'repeats': len(values)}


def installed_versions(packages) -> dict[str, str]:
    """The installed version of each of `packages` that is installed."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def timed_steps(time_steps: Callable[[int], list[float]], steps: int, blocks_from_stdin: bool) -> list[float]:
    """Seconds of timed train steps: `time_steps(steps)`; or, with `blocks_from_stdin` (how
    `benchmarks.peers` interleaves its workers), a block of `steps` for each line read from stdin,
    each block's seconds printed as one JSON line {"block_step_seconds": [...]}, until stdin closes."""
    if not blocks_from_stdin:
        return time_steps(steps)
    times = []
    for _ in sys.stdin:
        block = time_steps(steps)
        print(json.dumps({'block_step_seconds': block}), flush=True)
        times += block
    if not times:
        raise ValueError('--blocks_from_stdin: stdin closed before the first block; nothing was timed')
    return times
