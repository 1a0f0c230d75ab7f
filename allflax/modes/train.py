"""--mode=train: trains a recipe into a workdir, resuming from its latest checkpoint, and ends with a
test evaluation. The loop lives in `allflax.training.loop`, below the modes, since --mode=montecarlo
runs it too."""
import ml_collections

from allflax.training import loop


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the final evaluation's metrics."""
    return loop.train_and_evaluate(config, workdir)
