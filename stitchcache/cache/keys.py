"""Content keys: a feature store's path is a hash of everything that determines its bytes."""
from __future__ import annotations

import hashlib
import json

# Bump when extraction changes what lands in a store (forces new keys; old stores stay valid).
EXTRACT_FORMAT_VERSION = 2   # 2: stores carry image_ids.json


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(parts: dict) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def feature_key_parts(*, backbone_facts: dict, weights_digest: str, manifest_digest: str,
                      layers: list[int], dtype: str) -> dict:
    """What goes into a feature store's key. Model *names* from configs are deliberately absent,
    so two experiments calling the same model differently still share the store."""
    spec = dict(backbone_facts["spec"])
    spec.pop("checkpoint", None)  # the path does not matter, the weights' digest does
    return {
        "format": EXTRACT_FORMAT_VERSION,
        "backbone": {**{k: v for k, v in backbone_facts.items() if k != "spec"}, "spec": spec},
        "weights": weights_digest,
        "dataset": manifest_digest,
        "layers": sorted(int(l) for l in layers),
        "dtype": dtype,
    }
