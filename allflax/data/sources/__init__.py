"""Data sets by `data.name`: the embedded synthetic ones (synthetic.py) and the real on-disk
layouts, each listed by a function `(data.dir, data.variant) -> Listing`, and each with its published
facts (`describe`)."""
from allflax.data.sources import all_aria, all_idb2, cnmc2019, facts, image_folder, synthetic
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


PUBLISHED_FACTS = {'cnmc2019': cnmc2019.FACTS, 'all_aria': all_aria.FACTS, 'all_idb2': all_idb2.FACTS}


def describe(data, *, seed: int) -> facts.Facts:
    """The facts of the data set of the config's `data` section: published ones for the known sets, the
    synthetic sets' own (drawn with `seed`), and for image_folder what the user states in `data.facts`
    (unknown where not stated)."""
    if data.name in synthetic.CLASS_NAMES:
        return synthetic.facts(data.name, num_images=data.num_images, num_patients=data.num_patients, seed=seed)
    if data.name in PUBLISHED_FACTS:
        return PUBLISHED_FACTS[data.name]
    if data.name == 'image_folder':
        return facts.from_config(data.get('facts') or {})
    raise ValueError(f'unknown data.name={data.name!r}; available: {", ".join(NAMES)}')
