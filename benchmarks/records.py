"""Fields of the JSON lines the benchmarks print, computed without importing JAX or any other
framework: a peer worker (`benchmarks.peer_step`) loads only the framework it measures."""
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
