"""What a test does when this host lacks a platform dependency that CI has: FUSE (/dev/fuse,
fusermount3, mfusepy), `unshare`, mounting a tmpfs, a C compiler, JAX's CUDA plugin and ptxas,
allflax's oneDNN kernels. It skips, saying why; under ALLFLAX_REQUIRE_PLATFORM_TESTS=1 (.ci/run
sets it) on Linux x86-64, where all of them are installable, it fails with the same reason, so CI
never passes with those tests unrun. Skips about the CPU model (no bfloat16 in oneDNN) are not
for this helper: no install brings them."""
import os
import platform
import sys

import pytest

FLAG = 'ALLFLAX_REQUIRE_PLATFORM_TESTS'


def required() -> bool:
    """Whether a missing platform dependency fails the test here rather than skipping it."""
    return os.environ.get(FLAG) == '1' and sys.platform == 'linux' and platform.machine() == 'x86_64'


def missing(reason: str):
    """Skips the test for `reason`, or fails it where the platform tests are required."""
    if required():
        pytest.fail(f'{reason} ({FLAG}=1: this test must run here)', pytrace=False)
    skipped = pytest.skip.Exception(reason)
    skipped._use_item_location = True  # -rs then names the test, not this line (as for skipif).
    raise skipped
