"""Data sets by `data.name`: the embedded synthetic ones (synthetic.py) and the real on-disk
layouts, each listed by a function `(data.dir, data.variant) -> Listing`."""
from allflax.data.sources import all_aria, all_idb2, cnmc2019, image_folder, synthetic
from allflax.data.sources.listing import Listing

REAL = {
    'cnmc2019': lambda data_dir, variant: cnmc2019.list_records(data_dir),
    'all_aria': all_aria.list_records,
    'all_idb2': lambda data_dir, variant: all_idb2.list_records(data_dir),
    'image_folder': lambda data_dir, variant: image_folder.list_records(data_dir),
}
NAMES = (*synthetic.CLASS_NAMES, *REAL)


def list_records(name: str, data_dir: str, variant: str) -> Listing:
    if name not in REAL:
        raise ValueError(f'unknown data.name={name!r}; available: {", ".join(NAMES)}')
    return REAL[name](data_dir, variant)
