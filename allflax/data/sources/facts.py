"""What a data set's images are and where they came from, as its publishers state it: the fields the
CLAIM 2024 and TRIPOD+AI checklists ask of a model's data, carried into a bundle's metadata.json and
model card. A fact that is not published is UNKNOWN; one not confirmed from a primary source says
"(unconfirmed)"."""
import dataclasses

UNKNOWN = 'unknown'
UNCONFIRMED = '(unconfirmed)'


@dataclasses.dataclass(frozen=True)
class Facts:
    title: str = UNKNOWN  # The data set as its publishers name it.
    specimen: str = UNKNOWN  # Peripheral blood or bone marrow, smear or other.
    stain: str = UNKNOWN
    acquisition: str = UNKNOWN  # Microscope, camera, file format.
    magnification: str = UNKNOWN
    microns_per_pixel: str = UNKNOWN
    image_type: str = UNKNOWN  # Single-cell crops or multi-cell fields.
    patients: str = UNKNOWN  # As published; the run's own counts are in its splits.
    images: str = UNKNOWN
    sites: str = UNKNOWN
    labels: str = UNKNOWN  # Who labelled the images, against what reference.
    source: str = UNKNOWN  # DOI or URL.
    licence: str = UNKNOWN
    citation: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fact_sources: tuple[str, ...] = ()  # Where the facts above were read.

    def as_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


# The fields a user states in the config (`data.facts`) for a set of their own: the strings above.
TEXT_FIELDS = tuple(field.name for field in dataclasses.fields(Facts) if field.type is str)


def from_config(section) -> Facts:
    """A user's `data.facts` section (a mapping; fields it lacks are UNKNOWN)."""
    values = {name: str(section.get(name, UNKNOWN) or UNKNOWN) for name in TEXT_FIELDS}
    citation = str(section.get('citation', UNKNOWN) or UNKNOWN)
    return Facts(**values, citation=() if citation == UNKNOWN else (citation,),
                 fact_sources=('stated by the user in the config (data.facts)',))
