"""The recipes shrunk to seconds for tests: `:demo` at 32 px, batches of 8, a few steps. A plain
module, so that conftest's fixtures and the test subprocesses (multiprocess_run.py) build them alike."""
from ml_collections import ConfigDict

from configs import efficientnetv2_b3_se, vgg19_mhsa


def tiny(recipe, cache_dir: str, *, num_images: int, num_patients: int, total_steps: int, log_every_steps: int,
         eval_every_steps: int, checkpoint_every_steps: int, bootstrap_samples: int | None = None) -> ConfigDict:
    """`recipe`'s (a configs module) demo config on `num_images` synthetic images cached in `cache_dir`;
    `bootstrap_samples` where given, else the recipe's."""
    config = recipe.get_config('demo')
    with config.unlocked():
        config.data.image_size = 32
        config.data.num_images = num_images
        config.data.num_patients = num_patients
        config.data.cache_dir = cache_dir
        config.batch_size = 8
        config.total_steps = total_steps
        config.log_every_steps = log_every_steps
        config.eval_every_steps = eval_every_steps
        config.checkpoint_every_steps = checkpoint_every_steps
        if bootstrap_samples is not None:
            config.eval.bootstrap_samples = bootstrap_samples
    return config


def vgg19_mhsa_config(cache_dir: str, **overrides) -> ConfigDict:
    """VGG19+MHSA on 192 images of 16 patients for 6 steps; `overrides` are `tiny`'s keywords."""
    return tiny(vgg19_mhsa, cache_dir, num_images=192, num_patients=16,
                **{'total_steps': 6, 'log_every_steps': 2, 'eval_every_steps': 3, 'checkpoint_every_steps': 2,
                   **overrides})


def efficientnetv2_b3_se_config(cache_dir: str) -> ConfigDict:
    """EfficientNetV2-B3+SE on 96 images of 12 patients for 3 steps: its batch statistics move off
    their initial values."""
    return tiny(efficientnetv2_b3_se, cache_dir, num_images=96, num_patients=12, total_steps=3, log_every_steps=3,
                eval_every_steps=3, checkpoint_every_steps=3, bootstrap_samples=20)
