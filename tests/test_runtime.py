"""Process-wide settings (allflax/runtime.py, allflax/cpu/memory.py), each checked in a fresh Python process."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A step whose temporaries XLA:CPU allocates as one ~128 MB block: minor page faults per call
# (/proc/self/stat, field 10) once warm, after keep_freed_memory() or without it.
_FAULTS_PER_CALL = '''
import json, sys
from allflax.cpu import memory
kept = memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
import jax, jax.numpy as jnp

def minor_faults():
    return int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[7])

@jax.jit
def step(x, w):
    wide = jnp.tanh(x @ w)  # [4096, 4096] float32: a temporary the output does not keep.
    return wide @ w.T + jnp.sin(wide).sum()

x, w = jnp.ones((4096, 8)), jnp.full((8, 4096), 1e-3)
for _ in range(20):  # Until the heap has holes for every block a call takes.
    step(x, w).block_until_ready()
before = minor_faults()
for _ in range(10):
    step(x, w).block_until_ready()
print(json.dumps({'kept': kept, 'faults_per_call': (minor_faults() - before) / 10,
                  'late': memory.keep_freed_memory()}))
'''


def _run_script(script: str, *args: str) -> dict:
    """The JSON object `script` prints last, run in a fresh Python process on the CPU."""
    result = subprocess.run([sys.executable, '-c', script, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux') or 'CS_GNU_LIBC_VERSION' not in os.confstr_names,
                    reason='glibc malloc and /proc are Linux-with-glibc things')
def test_keep_freed_memory_stops_page_faults_of_the_step_temporaries():
    default, kept = _run_script(_FAULTS_PER_CALL, 'default'), _run_script(_FAULTS_PER_CALL, 'keep')
    # 128 MB of temporaries in 4 KiB pages: ~32 k faults a call when they go back to the kernel.
    assert default['faults_per_call'] > 16000, default
    # Kept, a call faults only when the heap grows: the next call's block can be taken before the
    # last one is freed (on a worker thread), so the heap settles at a few blocks, not one.
    assert kept['kept'] is True and kept['faults_per_call'] < default['faults_per_call'] / 4, (kept, default)
    # Once the backend runs, the arena limit cannot bind: it says so instead of half-applying.
    assert kept['late'] is False and default['late'] is False


# Garbage-collector state around setup_objects_frozen(), after JAX and Flax are imported.
_FROZEN = '''
import gc, json
import flax.nnx, jax
from allflax import runtime

class Node:
    pass

out = {'tracked_before': len(gc.get_objects())}
with runtime.setup_objects_frozen():
    out['frozen'] = gc.get_freeze_count()
    out['tracked_inside'] = len(gc.get_objects())
    cycle = Node()
    cycle.self = cycle
    del cycle
    out['collected_inside'] = gc.collect()
out['frozen_after'] = gc.get_freeze_count()
out['tracked_after'] = len(gc.get_objects())
print(json.dumps(out))
'''


def test_setup_objects_frozen_leaves_them_out_of_collections_until_the_end():
    gc_state = _run_script(_FROZEN)
    assert gc_state['tracked_before'] > 50_000  # What a full collection walks once the libraries are in.
    assert gc_state['frozen'] >= 0.9 * gc_state['tracked_before']
    assert gc_state['tracked_inside'] < 1_000  # Inside, only what came after.
    assert gc_state['collected_inside'] >= 1  # Garbage made inside is still collected.
    assert gc_state['frozen_after'] == 0 and gc_state['tracked_after'] >= 0.99 * gc_state['frozen']  # Back in.


@pytest.mark.parametrize('environment, multi_host', [
    ({}, False),
    ({'COLAB_TPU_1VM': '1', 'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_ACCELERATOR_TYPE': 'v5litepod-1'}, False),
    ({'TPU_WORKER_HOSTNAMES': 't1v-n-0,t1v-n-1'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234'}, True),
    ({'ALLFLAX_DISTRIBUTED': '1'}, True),
], ids=['plain', 'colab_tpu', 'pod_slice', 'coordinator', 'detect'])
def test_only_a_cluster_of_several_hosts_starts_jax_distributed(environment, multi_host):
    from allflax import runtime
    assert runtime.is_multi_host(environment) is multi_host


# What a CPU run prints before its first step, with Colab's TPU variables set and JAX left to choose.
_CPU_START = '''
import json
from allflax import runtime
runtime.initialize()
import jax
print(json.dumps({'platform': jax.devices()[0].platform, 'processes': jax.process_count()}))
'''


@pytest.mark.skipif(any(os.path.exists(path) for path in ('/dev/accel0', '/dev/nvidia0')),
                    reason='this host has an accelerator: JAX is right to look for it')
def test_a_cpu_host_starts_quietly_with_colab_variables(tmp_path):
    """libtpu is installed (a test requirement): on a host without TPU devices, JAX is kept on the
    CPU before it looks for one, so none of libtpu's discovery errors is printed, and Colab's
    single-host variables start no jax.distributed (which would wait for a coordinator)."""
    environment = {key: value for key, value in os.environ.items() if key != 'JAX_PLATFORMS'}
    environment.update({'COLAB_TPU_1VM': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
                        'TPU_ACCELERATOR_TYPE': 'v5litepod-1', 'ALLFLAX_COMPILATION_CACHE': str(tmp_path)})
    result = subprocess.run([sys.executable, '-c', _CPU_START], cwd=ROOT, capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {'platform': 'cpu', 'processes': 1}
    assert 'TPU' not in result.stderr and 'libtpu' not in result.stderr, result.stderr


# A start that initialises a small layer; prints the compile cache's hits and misses.
_INITIALISE = '''
import collections, json
from allflax import runtime
runtime.initialize()
from flax import nnx
from jax import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda name, **_: events.update([name.rsplit('/', 1)[-1]]))
nnx.Conv(3, 16, (3, 3), rngs=nnx.Rngs(0))
print(json.dumps({'hits': events['cache_hits'], 'misses': events['cache_misses']}))
'''


def test_a_second_start_reads_even_the_initialisers_programs_from_the_cache(tmp_path):
    """Initialisers compile one small program per weight shape, well under JAX's 1 s threshold for
    its persistent cache: allflax caches every program, so the next process reads them back."""
    environment = dict(os.environ, ALLFLAX_COMPILATION_CACHE=str(tmp_path))
    starts = []
    for _ in range(2):
        result = subprocess.run([sys.executable, '-c', _INITIALISE], cwd=ROOT, capture_output=True, text=True,
                                env=environment, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        starts.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = starts
    assert first['hits'] == 0 and first['misses'] > 0
    assert second == {'hits': first['misses'], 'misses': 0}
