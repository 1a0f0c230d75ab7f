"""--mode=train: trains a recipe into a workdir, resuming from its latest checkpoint, and ends in a
test evaluation. The loop lives in `allflax.training.loop`, below the modes, since --mode=montecarlo
runs it too; these are the names that main.py and the tests use of it."""
from allflax.training.loop import (Diverged, Interrupted, accumulation_steps, build, make_eval_step,
                                   make_train_step, resolve_input_convention, total_steps_of,
                                   train_and_evaluate)

__all__ = ['Diverged', 'Interrupted', 'accumulation_steps', 'build', 'make_eval_step', 'make_train_step',
           'resolve_input_convention', 'total_steps_of', 'train_and_evaluate']
