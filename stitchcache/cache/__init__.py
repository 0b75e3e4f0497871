"""The feature cache: content keys, Zarr feature stores, streaming readers."""
from .keys import EXTRACT_FORMAT_VERSION, content_key, feature_key_parts
from .quant import Quantized, QuantizedArray, dequantize, quantize
from .store import FeatureStore, IncompleteStore, StoreBusy, StoreWriter, layer_name, open_record, open_store

# the torch readers (loader.py) load on first use, so that inspecting the cache (`stitchcache cache`,
# `plan`, the workflow's DAG build) does not import torch (tests/test_startup.py)
_LOADER = ("ChunkDataset", "chunk_loader", "iter_batches", "pool_tokens", "pooled_features")


def __getattr__(name):
    if name in _LOADER:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EXTRACT_FORMAT_VERSION", "ChunkDataset", "FeatureStore", "IncompleteStore", "Quantized",
           "QuantizedArray", "StoreBusy", "StoreWriter", "chunk_loader", "content_key", "dequantize",
           "feature_key_parts", "iter_batches", "layer_name", "open_record", "open_store", "pool_tokens",
           "pooled_features", "quantize"]
