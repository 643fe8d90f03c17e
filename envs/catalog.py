"""The names of the project's datasets, said once: the qualities, and the Minari ids under which the generator
(envs/generate.py) stores a domain's datasets and the loader (envs/datasets.py) finds them. Both import this module;
datasets.py calls the generator, never the other way round."""
from __future__ import annotations

from typing import Literal

QUALITIES = ("random", "medium", "medium-replay", "expert", "medium-expert")
Quality = Literal[QUALITIES]  # the type of every script's --quality flag
GENERATED_NAMESPACE = "crossdomain"  # the papers' physics; v5 physics: crossdomain-v5


def generated_namespace(physics: str = "papers") -> str:
    """The Minari namespace of this project's generated datasets in a physics: crossdomain, crossdomain-v5."""
    return GENERATED_NAMESPACE if physics == "papers" else f"{GENERATED_NAMESPACE}-{physics}"


def generated_dataset_id(domain: str, quality: str, physics: str = "papers") -> str:
    """The Minari id under which this project's generator stores the dataset of (domain, quality, physics)."""
    return f"{generated_namespace(physics)}/{domain}/{quality}-v0"
