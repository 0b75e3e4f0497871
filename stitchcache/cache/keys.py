"""Content keys: a feature store's path is a hash of everything that determines its bytes."""
from __future__ import annotations

import hashlib
import json

# Bump when extraction changes what lands in a store (forces new keys; old stores stay valid).
# 2: high-bit-depth images scaled to 8 bits (were clipped); 3: rows in a seeded random order
# (`order` array), the view policy (shared | native), both keyed through token_settings, and
# stores carry image_ids.json (per-row manifest ids).
EXTRACT_FORMAT_VERSION = 3

# `extract:` settings that change how a store is computed or laid out on disk, never its values.
# Every other extract setting (layers, dtype, view, and any key added later) enters both the store
# key and the request key: a new setting is keyed unless it is listed here.
NON_TOKEN_SETTINGS = frozenset({
    "batch_size",    # images per forward (a ViT's tokens do not depend on the batch)
    "num_workers",   # decode workers
    "chunk_size",    # storage geometry (the geometry on disk wins when resuming)
    "shard_size",
    "compressor",    # lossless
    "device",        # cpu / cuda: recorded in the store attributes, not keyed (float tolerance)
    "seed",          # extraction draws no random numbers (random-init weights use a fixed seed)
    "lock_timeout",  # how long to wait for another writer
})
TOKEN_SETTING_DEFAULTS = {"layers": "all", "dtype": "float16", "view": "shared", "order_seed": 0}


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(parts: dict) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def token_settings(settings: dict) -> dict:
    """The extract settings that decide a store's values (defaults filled in)."""
    out = {**TOKEN_SETTING_DEFAULTS, **{k: v for k, v in (settings or {}).items() if k not in NON_TOKEN_SETTINGS}}
    return out


def feature_key_parts(*, backbone_facts: dict, weights_digest: str, manifest_digest: str,
                      layers: list[int], dtype: str, model_inputs: dict, settings: dict) -> dict:
    """What goes into a feature store's key. Model *names* from configs are deliberately absent,
    so two experiments calling the same model differently still share the store.

    model_inputs: ``backends.identity.model_inputs`` (config files' digests, library versions);
    settings: the extract settings (only ``token_settings`` of them are keyed)."""
    spec = dict(backbone_facts["spec"])
    spec.pop("checkpoint", None)  # the path does not matter, the weights' digest does
    return {
        "format": EXTRACT_FORMAT_VERSION,
        "backbone": {**{k: v for k, v in backbone_facts.items() if k != "spec"}, "spec": spec},
        "weights": weights_digest,
        "model_files": model_inputs["files"],
        "versions": model_inputs["versions"],
        "dataset": manifest_digest,
        "settings": {**token_settings(settings), "layers": sorted(int(l) for l in layers), "dtype": dtype},
    }
