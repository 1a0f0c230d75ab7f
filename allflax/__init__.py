"""allflax: diagnosing acute lymphoblastic leukaemia from blood and bone-marrow smear images, with
JAX and Flax.

It reproduces two published recipes, each trained with sigmoid focal loss on patient-wise splits:
VGG19 with multi-head self-attention (`configs/vgg19_mhsa.py`) and EfficientNetV2-B3 with
squeeze-and-excitation (`configs/efficientnetv2_b3_se.py`). A run trains, resumes and is evaluated
with patient-level intervals, calibrated probabilities and a model card, and is exported as a bundle
that predicts with ONNX Runtime alone.

Where things are, top to bottom (docs/LAYOUT.md; imports only point down):
  modes/       one module per `python main.py --mode=...`: train, evaluate, predict, export, compare,
               montecarlo
  aot/         a recipe compiled for TPUs and GPUs on any host, with the chips' and GPUs' facts
  deploy/      the exported bundle: format, schema, model card, its own predictor
  training/    the loop, train state, steps, optimiser, loss, checkpoints, the workdir's lock and checks
  evaluation/  inference, metrics, intervals, calibration, operating point, Grad-CAM, report
  models/      the networks, built from tables, and their pretrained weights
  data/        data sets, frozen patient-wise splits, preprocessing, augmentation, the input pipeline
  runtime.py, sharding.py, files.py   process set-up, device meshes, files written whole
  cpu/, tpu/   how XLA:CPU and TPUs compute what they do their own way (kernels)
"""
