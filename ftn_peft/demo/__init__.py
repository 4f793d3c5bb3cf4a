"""Small, offline demos: real data that ships with scikit-learn and a tiny timm ResNet."""
from .digits import (
    DOMAIN_SPECS,
    DOMAINS,
    IMAGE_SIZE,
    Domain,
    DomainSpec,
    build_source_model,
    evaluate,
    load_images,
    load_source_model,
    make_domain,
    pool_indices,
    source_dataset,
    to_hf_dataset,
)

__all__ = [
    "DOMAIN_SPECS",
    "DOMAINS",
    "IMAGE_SIZE",
    "Domain",
    "DomainSpec",
    "build_source_model",
    "evaluate",
    "load_images",
    "load_source_model",
    "make_domain",
    "pool_indices",
    "source_dataset",
    "to_hf_dataset",
]
