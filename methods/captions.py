"""Captions for the text of image-text (CLIP) and text (SimCSE) methods, generated from the data: nothing is
downloaded.

``shapes`` images are described from their attributes (shape, colour, size, position) with several templates; other
labelled datasets get the class-name templates of their label (the prompts of Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"). Every item has one caption per template; the first is
the deterministic caption evaluations use. Zero-shot prompts of attribute-captioned data name the class alone, a
sentence no training caption is, so zero-shot classification asks the text tower to generalise, not to recall.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.errors import ConfigError
from core.splits import Split

SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "a {size} {shape} {where}",
    "a picture of a {colour} {shape} {where}",
    "there is a {size} {colour} {shape}",
)
"""Attribute templates for ``shapes``; ``{where}`` is the position phrased as in :data:`WHERE`."""

ATTRIBUTE_PROMPTS: tuple[str, ...] = ("a {}", "a picture of a {}", "there is a {}")
"""Zero-shot prompts of datasets captioned from attributes: :data:`SHAPE_TEMPLATES` with the class alone."""

CLASS_TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a picture of a {}", "an image of a {}")
"""Class-name templates (a few of CLIP's ImageNet prompts): the captions of labelled datasets and the zero-shot
prompts."""

WHERE: dict[str, str] = {
    "top left": "in the top left",
    "top centre": "at the top",
    "top right": "in the top right",
    "middle left": "on the left",
    "centre": "in the centre",
    "middle right": "on the right",
    "bottom left": "in the bottom left",
    "bottom centre": "at the bottom",
    "bottom right": "in the bottom right",
}
"""The 3x3 grid cells of :data:`harness.data.shapes.POSITIONS`, as a caption says them."""


def _fix_articles(text: str) -> str:
    """``a orange`` -> ``an orange``."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def class_prompts(classes: Sequence[str], templates: Sequence[str] = CLASS_TEMPLATES) -> list[list[str]]:
    """Per class, its caption under each template (underscores in names become spaces)."""
    return [[_fix_articles(t.format(name.replace("_", " "))) for t in templates] for name in classes]


def zero_shot_prompts(split: Split, classes: Sequence[str]) -> list[list[str]]:
    """Per class, the prompts of zero-shot classification: :data:`ATTRIBUTE_PROMPTS` for a split captioned
    from attributes, else :data:`CLASS_TEMPLATES` (CLIP's own practice)."""
    return class_prompts(classes, ATTRIBUTE_PROMPTS if split.attributes is not None else CLASS_TEMPLATES)


def describe(attributes: dict[str, str]) -> list[str]:
    """The captions of one ``shapes`` image, one per :data:`SHAPE_TEMPLATES`."""
    words = {**attributes, "where": WHERE[attributes["position"]]}
    return [_fix_articles(t.format(**words)) for t in SHAPE_TEMPLATES]


def captions_for(
    split: Split, classes: Sequence[str], dataset: str = "", method: str = "a text method"
) -> list[list[str]]:
    """Every caption of every item of ``split``: from its attributes where the split has them, else from its class name.

    Raises ConfigError (naming the dataset) when the split has no attributes and ``classes`` is empty.
    """
    if split.attributes is not None:
        return [describe(a) for a in split.attributes]
    if not classes:
        raise ConfigError(
            f"data.name: dataset {dataset!r} has no captions (per-image "
            f"attributes) and no class names; {method} needs text"
        )
    prompts = class_prompts(classes)
    return [prompts[y] for y in split.labels.tolist()]


def item_captions(split: Split, classes: Sequence[str], template: int = 0, dataset: str = "") -> list[str]:
    """One caption per item: the one of ``template`` (0: the deterministic caption of evaluations)."""
    return [c[template] for c in captions_for(split, classes, dataset)]
