"""Defaults every recipe shares, and the arg strings (`:demo`) that adjust them."""
import ml_collections

# Run-size settings for `:demo`: sized so the VGG19 demo trains on a 2-core CPU in minutes.
DEMO = dict(image_size=64, batch_size=16, total_steps=800, num_images=2400, num_patients=48,
            eval_every_steps=200, checkpoint_every_steps=200, log_every_steps=20)
# `:gpu` and `:tpu`: bfloat16 compute and a global batch that keeps the accelerator busy (one
# 80 GB GPU; a v2-8/v3-8 TPU, 32 per core). The learning rate stays the recipe's.
# `max_device_batch`: more images per device than this are taken as micro-batches of a step
# (gradient accumulation), e.g. 256 on one v5e chip's 16 GiB (`python -m allflax.aot.check`
# measures what fits). The micro-batches' mean gradient is the whole batch's update for models
# without batch norm (tests/test_accumulation.py); batch norm (EfficientNetV2, ResNet) normalises
# by each micro-batch's statistics (over all devices: batch_size / micro-batches images) and
# updates its running averages once per micro-batch, so `:tpu` on one chip (4 × 64) trains another
# model than on 8 chips (1 × 256). config.json's `derived` section records that batch.
# `checkpoint_every_steps`: a disconnect (Colab) loses at most ~10 minutes of a run, at a tenth of
# the slowest roofline of the TPUs and GPUs the config was checked for (benchmarks/tpu_check,
# benchmarks/gpu_check; benchmarks/RESULTS.md, "Checkpoints on Colab"); on the synthetic sets'
# 300 to 1,050 steps the first checkpoint comes before half of the run.
ACCELERATORS = {'gpu': dict(dtype='bfloat16', batch_size=128, max_device_batch=128, checkpoint_every_steps=100),
                'tpu': dict(dtype='bfloat16', batch_size=256, max_device_batch=64, checkpoint_every_steps=100)}
# After `gpu`, for GPUs without bfloat16 (`:gpu,t4`). A T4 (Turing; Colab's free GPU, Kaggle's two)
# computes in float16 on its tensor cores (65 TFLOP/s against 8.1 in float32), with dynamic loss
# scaling (allflax/training/loss_scale.py). Kaggle's P100 (Pascal, no tensor cores) in float32, in
# micro-batches that fit its 16 GB: at a tenth of its VGG19+MHSA roofline, 30 steps of 128 take
# 8 minutes (benchmarks/RESULTS.md, "Checkpoints on Colab").
GPU_VARIANTS = {'t4': dict(dtype='float16'),
                'p100': dict(dtype='float32', max_device_batch=64, checkpoint_every_steps=30)}


def base_config(*, model: str, data: str, image_size: int, batch_size: int, num_epochs: int,
                learning_rate: float) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = model
    config.model.options = ml_collections.ConfigDict()  # Passed to models.create as keywords.
    # '' (from scratch), 'imagenet' (Keras's ImageNet weights for the backbone, fetched and converted
    # once: the papers' setting), or a directory written by `python -m allflax.models.keras_weights`.
    config.model.init_from = ''
    config.model.freeze_backbone_steps = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = data
    config.data.dir = ''  # Real data sets: the downloaded folder.
    config.data.variant = 'original'  # all_aria: original | segmented.
    # Applied once, in order, when the cache of uint8 tiles is prepared (real data sets).
    config.data.preprocess = ('resize_pad',)
    config.data.skip_corrupt = False  # True: skip unreadable images (listed in splits.json).
    # image_folder: what the images are and where they came from, for the bundle's model card (the
    # known sets carry their published facts); each field left 'unknown' is shown as unknown.
    config.data.facts = ml_collections.ConfigDict({name: 'unknown' for name in (
        'title', 'specimen', 'stain', 'acquisition', 'magnification', 'microns_per_pixel', 'image_type',
        'patients', 'images', 'sites', 'labels', 'source', 'licence', 'citation')})
    config.data.split = 'patient'  # patient | official (C-NMC's labelled test set) | random.
    config.data.fold = -1  # >= 0: k-fold by patient, this fold is the test split.
    config.data.num_folds = 5
    config.data.image_size = image_size
    config.data.cache_dir = ''  # Defaults to ~/.cache/allflax.
    config.data.num_images = 4000  # Synthetic sets only.
    config.data.num_patients = 80  # Synthetic sets only.
    config.data.split_fractions = ml_collections.ConfigDict({'train': 0.7, 'val': 0.15, 'test': 0.15})
    config.data.num_workers = 0  # Grain worker processes; 0 reads in the main process.
    # On-device augmentation (allflax/data/augment.py lists the names): the geometric ops first,
    # the others in the order named.
    config.data.augment = ('flip', 'rot90')
    config.data.augment_params = ml_collections.ConfigDict({
        'rotation_degrees': 15.0,  # rotate: uniform in ± degrees.
        'crop_scale': (0.8, 1.0),  # crop: the fraction of the tile's area kept...
        'crop_ratio': (3 / 4, 4 / 3),  # ...at an aspect ratio (width/height) log-uniform in this range.
        # color: factors uniform in 1 ± value; hue: ± this fraction of a full turn.
        'brightness': 0.2,
        'contrast': 0.2,
        'saturation': 0.2,
        'hue': 0.04,
        'blur_sigma': (0.1, 1.0),  # blur: Gaussian sigma in pixels, uniform.
        # hed: stain densities scaled by 1 ± hed_scale and shifted by ± hed_shift, in skimage's
        # units (optical density / ln 1e6), where 0.01 of haematoxylin dims red and green by ~9 %.
        'hed_scale': 0.05,
        'hed_shift': 0.01,
    })
    # How uint8 RGB tiles become the model's input (allflax/data/input_convention.py), applied on device
    # in training, evaluation, prediction and bundles alike. '' takes that of the weights model.init_from
    # starts from, recorded with them: 'caffe' (BGR, ImageNet means subtracted from 0-255, no scaling)
    # for Keras's VGG16/VGG19/ResNet, 'imagenet_mean_std' for EfficientNetV2 B0-B3, 'minus_one_to_one'
    # (x/128 - 1) for EfficientNetV2-S; a value that contradicts them is refused. From scratch, '' is
    # 'imagenet_mean_std': (x/255 - data.mean) / data.std, RGB. config.json holds the value used.
    config.data.input_convention = ''
    config.data.mean = (0.485, 0.456, 0.406)  # ImageNet's RGB mean and std: imagenet_mean_std only.
    config.data.std = (0.229, 0.224, 0.225)

    config.batch_size = batch_size  # Global, over all devices and hosts.
    config.max_device_batch = 0  # > 0: a device's larger share runs as micro-batches (batch norm: per micro-batch).
    config.num_epochs = num_epochs
    config.total_steps = 0  # > 0 overrides num_epochs.
    config.dtype = 'float32'  # Compute dtype; parameters stay float32.

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = learning_rate
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_fraction = 0.05
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.grad_clip_norm = 1.0

    config.loss = ml_collections.ConfigDict()
    # Sigmoid focal loss: a float, or one value per class as a tuple (--config.loss.alpha='(0.3,0.2,0.2,0.3)').
    # alpha[c] weighs class c's positives (its images) and 1 - alpha[c] its negatives (every other class's
    # images: each class's logit is its own binary task). Not a class weight: raising alpha[c] also
    # lowers the weight that class c's logit gives to all the other classes' images.
    config.loss.alpha = ml_collections.FieldReference(0.25, field_type=object)
    config.loss.gamma = 2.0

    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2  # The latest N; the best by validation accuracy is kept too.

    config.eval = eval_config()
    config.montecarlo = ml_collections.ConfigDict()
    config.montecarlo.iterations = 100  # Paper 2's count of patient-wise re-splits (--mode=montecarlo).
    return config


def eval_config() -> ml_collections.ConfigDict:
    """Evaluation settings; also filled into the config.json of runs trained before they existed."""
    config = ml_collections.ConfigDict()
    config.tta = False  # Average the probabilities of the 8 flips/transposes of each image.
    config.temperature_scaling = True  # Fit a temperature on val logits (NLL), apply it to the split and predictions.
    # Binary tasks: a threshold on the positive class's probability (eval.positive_class; '' is the second
    # class, the malignant one of C-NMC and ALL-IDB2) chosen on val for this sensitivity, used by predict
    # and bundles (allflax/evaluation/operating_point.py).
    config.target_sensitivity = 0.95
    config.positive_class = ''
    config.bootstrap_samples = 1000  # Resamples (of patients where known) behind the 95 % intervals.
    config.gradcam_examples = 16  # Grad-CAM overlays in the report, half of them errors where there are enough.
    return config


def apply_args(config: ml_collections.ConfigDict, arg: str | None,
               demo_overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Applies comma-separated arg strings in order, e.g. `demo` or `gpu`.

    `demo_overrides` maps dotted keys ('data.augment') to the values a recipe's `demo` needs
    on top of DEMO's run size.
    """
    for name in filter(None, (arg or '').split(',')):
        if name in ACCELERATORS or name in GPU_VARIANTS:
            for key, value in {**ACCELERATORS, **GPU_VARIANTS}[name].items():
                config[key] = value
            continue
        if name != 'demo':
            raise ValueError(f'unknown config arg {name!r}; known: demo, {", ".join([*ACCELERATORS, *GPU_VARIANTS])}')
        config.data.image_size = DEMO['image_size']
        config.data.num_images = DEMO['num_images']
        config.data.num_patients = DEMO['num_patients']
        config.batch_size = DEMO['batch_size']
        config.total_steps = DEMO['total_steps']
        for key in ('eval_every_steps', 'checkpoint_every_steps', 'log_every_steps'):
            config[key] = DEMO[key]
        for dotted_key, value in (demo_overrides or {}).items():
            *parents, key = dotted_key.split('.')
            node = config
            for parent in parents:
                node = node[parent]
            node[key] = value
    config.lock()
    return config
