"""The feature cache: content keys, Zarr feature stores, streaming readers."""
from .keys import EXTRACT_FORMAT_VERSION, content_key, feature_key_parts
from .loader import iter_batches, pool_tokens, pooled_features
from .store import FeatureStore, IncompleteStore, StoreBusy, StoreWriter, layer_name, open_record, open_store

__all__ = ["EXTRACT_FORMAT_VERSION", "FeatureStore", "IncompleteStore", "StoreBusy", "StoreWriter",
           "content_key", "feature_key_parts", "iter_batches", "layer_name", "open_record", "open_store",
           "pool_tokens", "pooled_features"]
