"""The former name of `allflax.aot_check` (which now checks GPUs too), kept for the commands,
notebooks and imports that use it: `python -m allflax.tpu_check` runs the check, and
`from allflax import tpu_check` gives the module itself."""
import sys

from allflax import aot_check

if __name__ == '__main__':
    aot_check.run()
else:
    sys.modules[__name__] = aot_check
