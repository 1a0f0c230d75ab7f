"""The hand-written TensorBoard event files, read back by TensorFlow's own reader."""
import glob

import pytest

from allflax.training import summary_writer


def test_crc32c_known_value():
    assert summary_writer.crc32c(b'123456789') == 0xE3069283  # The CRC-32C check value.


def test_event_file_reads_back_in_tensorflow(tmp_path):
    writer = summary_writer.SummaryWriter(str(tmp_path))
    writer.write({'step': 20, 'train_loss': 0.25, 'learning_rate': 1e-4, 'images_per_sec': 30})
    writer.write({'step': 40, 'val_accuracy': 0.75, 'val_f1_macro': 0.5})
    writer.close()
    tf = pytest.importorskip('tensorflow')
    (path,) = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
    events = list(tf.compat.v1.train.summary_iterator(path))  # Checks both CRCs of every record.
    assert events[0].file_version == 'brain.Event:2'
    scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    assert scalars == pytest.approx({(20, 'train/loss'): 0.25, (20, 'learning_rate'): 1e-4,
                                     (20, 'images_per_sec'): 30.0, (40, 'val/accuracy'): 0.75,
                                     (40, 'val/f1_macro'): 0.5})
