"""One process of a two-process run's lock check (argv: JSON), for test_multiprocess.py.

Process 0 holds the workdir's lock; at the second check another host takes it over. Prints JSON:
the process and the check at which it stopped, with its message.
"""
import json
import os
import sys

import jax

from allflax.training import loop, workdir_lock


def main(run: dict):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{run["port"]}', num_processes=2,
                               process_id=run['process_id'])
    lock = workdir_lock.WorkdirLock(run['workdir']) if jax.process_index() == 0 else None
    if lock:
        lock.acquire()
    check = loop.writer_check(lock, run['workdir'])
    out = {'process': jax.process_index(), 'stopped_at': None}
    for index in range(3):
        if index == 1 and lock:
            with open(os.path.join(run['workdir'], workdir_lock.LOCK_NAME), 'w') as f:
                json.dump({'host': 'host-b', 'pid': 4242, 'started': 'now', 'command': 'x', 'token': 'b' * 32,
                           'renewed': 'now', 'lease_seconds': 60.0}, f)
        try:
            check()
        except workdir_lock.WorkdirBusyError as error:
            out.update(stopped_at=index, error=str(error).splitlines()[0])
            break
    if lock:
        lock.release()
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
