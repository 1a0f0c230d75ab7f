"""--mode=eval: restore a run's checkpoint, predict a split of exactly the images the run recorded
in its splits.json, and write `<workdir>/eval/<split>/`: metrics.json (with intervals),
predictions.csv and the report (plots, Grad-CAM gallery)."""
import ml_collections

from allflax.data import input_convention, membership, pipeline
from allflax.evaluation import report, results
from allflax.training import restore


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, split_name: str = 'test',
             checkpoint_step: int | None = None, with_report: bool = True) -> dict:
    """Restores a checkpoint (the latest by default), writes `workdir/eval/<split>/` metrics.json
    and predictions.csv, and with `with_report` the report; returns the metrics."""
    recorded = restore.run_summary(workdir)['splits']
    available = membership.split_names(recorded)
    if split_name not in available:
        raise ValueError(f'unknown split {split_name!r}; available: {", ".join(available)}')
    # The run's own members of the split and of val (temperature scaling, the operating point).
    dataset = pipeline.load(config, recorded=recorded, run=workdir, action='evaluate',
                            needed=[name for name in available if name in (split_name, 'val')])
    restored = restore.restore(workdir, model=config.model, data=config.data,
                               dtype=config.dtype, seed=config.seed, num_classes=len(dataset.class_names),
                               checkpoint_step=checkpoint_step)
    values, predictions = results.evaluate_state(
        restored.eval_step, restored.state, dataset, split_name, restored.mesh, workdir, options=config.eval,
        batch_size=config.batch_size, seed=config.seed, split_method=config.data.split,
        checkpoint_step=restored.step, input_convention=input_convention.of(config.data).name)
    if with_report:
        explain = restore.explainer(restored, data=config.data, dtype=config.dtype, batch_size=config.batch_size)
        report.write_split_report(workdir, split_name, dataset.splits[split_name], dataset.class_names, values,
                                  predictions, explain, model_name=config.model.name,
                                  data_name=config.data.name, preprocess=config.data.preprocess,
                                  gradcam_examples=config.eval.gradcam_examples)
    return values
