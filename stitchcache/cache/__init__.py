"""The feature cache: content keys, Zarr feature stores, streaming readers."""
from .keys import EXTRACT_FORMAT_VERSION, content_key, feature_key_parts
from .loader import ChunkDataset, chunk_loader, iter_batches, pool_tokens, pooled_features
from .quant import Quantized, QuantizedArray, dequantize, quantize
from .store import FeatureStore, IncompleteStore, StoreBusy, StoreWriter, layer_name, open_record, open_store

__all__ = ["EXTRACT_FORMAT_VERSION", "ChunkDataset", "FeatureStore", "IncompleteStore", "Quantized",
           "QuantizedArray", "StoreBusy", "StoreWriter", "chunk_loader", "content_key", "dequantize",
           "feature_key_parts", "iter_batches", "layer_name", "open_record", "open_store", "pool_tokens",
           "pooled_features", "quantize"]
