"""extract: one forward pass per batch captures h_0..h_L and the final tokens into a FeatureStore.

Rows are the split's images in a seeded random order (``extract.order_seed``, recorded in the
store's ``order`` array), so every chunk mixes classes; each model sees the image region chosen by
``extract.view`` (shared: the same centred box for every model; native: the library's transform).

Resumable by chunk (or by shard, with extract.shard_size): finished units are skipped, so a killed
job continues where it stopped. Decoding/preprocessing run in DataLoader workers; tokens are
copied (on CUDA: non_blocking into pinned host buffers; int8 quantised on the device first) into a
small recycled pool of unit buffers, and unit writes run in a background thread while the next
batches are computed.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .backends import weights_digest
from .backends.identity import model_inputs
from .cache import FeatureStore, StoreBusy, StoreWriter, content_key, feature_key_parts
from .cache.keys import token_settings
from .cache.quant import Quantized, quantize_torch
from .data import open_split
from .data.scan import BadImages, checked_split
from .data.base import SEGMENTATION
from .data.segmentation import mask_transform
from .inputs import request_key
from .runtime import json_arg, log, pick_device, set_threads, write_json

# The model libraries (timm, open_clip, transformers: ~2-3 s to import, timm pulls in
# torchvision.ops and with it torch._dynamo) are imported only when a model is built
# (`model_from_spec`), so a cache hit answered from the request memo (`_memo_hit`) never pays them.


DEFAULT_LOCK_TIMEOUT = 3600.0  # seconds to wait for another process writing the same store


def resolve_layers(setting, depth: int) -> list[int]:
    if setting in (None, "all"):
        return list(range(depth + 1))
    layers = sorted({int(l) for l in setting})
    bad = [l for l in layers if not 0 <= l <= depth]
    if bad:
        raise SystemExit(f"error: extract.layers {bad} outside 0..{depth} for this model")
    return layers


VIEWS = ("shared", "native")


def image_order(n: int, seed: int | None) -> np.ndarray:
    """Store row i holds dataset image order[i]: a permutation drawn from ``seed`` and ``n`` only,
    so every model extracted from one split gets the same rows (None = the dataset's own order)."""
    if seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), n]).permutation(n).astype(np.int64)


def model_from_spec(model_spec: dict):
    """A config ``models.<name>`` entry -> frozen Backbone (checkpoint paths made absolute, so the
    spec stored with features and stitch checkpoints rebuilds the model from anywhere)."""
    from .backends import create_backbone

    ckpt = model_spec.get("checkpoint")
    if ckpt is not None:
        ckpt = str(Path(ckpt).expanduser().resolve())
    return create_backbone(model_spec["backbone"], checkpoint=ckpt, strict_load=model_spec.get("strict_load", True),
                           **(model_spec.get("kwargs") or {}))


def spec_inputs(model_spec: dict) -> dict:
    """Config files and library versions that define the model's tokens (backends.identity)."""
    return model_inputs(model_spec["backbone"], model_spec.get("kwargs"), model_spec.get("checkpoint"))


def store_key_parts(bb, model_spec: dict, data, settings: dict) -> dict:
    """The store's content key parts: the built model's facts (preprocessing included), weights,
    config files and library versions, the split's manifest and the token-changing settings."""
    tok = token_settings(settings)
    layers = resolve_layers(tok["layers"], bb.depth)
    return feature_key_parts(backbone_facts=bb.describe(), weights_digest=weights_digest(bb.spec.get("checkpoint")),
                             manifest_digest=data.digest(), layers=layers, dtype=tok["dtype"],
                             model_inputs=spec_inputs(model_spec), settings=settings)


def store_path_for(cache_root, key: str) -> Path:
    return Path(cache_root).resolve() / "features" / key[:24]


class _Writer(threading.Thread):
    """Writes finished units (chunks, or whole shards) in the background while the next batches are
    computed. Host buffers come from a small pool that is recycled after each write, so host memory
    is ``pool`` units however large the split: 3 chunks (one filling, at most two in flight) or 2
    shards (one filling, one being written)."""

    def __init__(self, writer: StoreWriter, pool: int, make_buffer):
        super().__init__(daemon=True)
        self.writer, self.q, self.free = writer, queue.Queue(), queue.Queue()
        self.pool, self.created, self.make_buffer, self.error = pool, 0, make_buffer, None

    def run(self):
        while (buf := self.q.get()) is not None:
            try:
                if buf.event is not None:  # the non_blocking device->host copies have landed
                    buf.event.synchronize()
                self.writer.write_unit(buf.unit, *buf.payload())
            except BaseException as e:  # surfaced by acquire()/put()/join_checked()
                self.error = e
                return
            self.free.put(buf)

    def acquire(self) -> "_UnitBuffer":
        """A free host buffer (blocks while all are in flight)."""
        while True:
            if self.error:
                raise self.error
            try:
                return self.free.get_nowait()
            except queue.Empty:
                pass
            if self.created < self.pool:
                self.created += 1
                return self.make_buffer()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    def put(self, buf: "_UnitBuffer"):
        if self.error:
            raise self.error
        self.q.put(buf)

    def join_checked(self):
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error


def _torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}[name]


class _UnitBuffer:
    """Preallocated host arrays for one unit (chunk or shard): tokens of every captured layer and
    the final tokens (int8 + float32 scales for int8 stores), labels. Pinned on CUDA so the
    device->host copies are asynchronous (non_blocking); plain memory on CPU."""

    def __init__(self, size: int, keys: list, num_tokens: int, width: int, dtype: str, pin: bool,
                 label_shape: tuple = (), label_dtype=np.int64):
        import torch

        self.dtype, self.quant = dtype, dtype == "int8"

        def empty(shape, dt):
            return torch.empty(shape, dtype=dt, pin_memory=pin) if pin else torch.empty(shape, dtype=dt)

        self.tokens = {k: empty((size, num_tokens, width), _torch_dtype(dtype)) for k in keys}
        self.scales = {k: empty((size, num_tokens), torch.float32) for k in keys} if self.quant else {}
        self.labels = np.empty((size, *label_shape), label_dtype)  # class indices, or (H, W) masks
        self.unit, self.n, self.filled, self.event = None, 0, 0, None

    def reset(self, unit: int, n: int) -> "_UnitBuffer":
        self.unit, self.n, self.filled, self.event = unit, n, 0, None
        return self

    @property
    def remaining(self) -> int:
        return self.n - self.filled

    def add(self, outs: dict, labels: np.ndarray, lo: int, hi: int, non_blocking: bool) -> None:
        """Copy rows lo:hi of a batch (device tensors) to the next free rows of the buffer."""
        f, t = self.filled, hi - lo
        for k, h in outs.items():
            part = h[lo:hi]
            if self.quant:  # quantised where the forward ran: only int8 + scales cross to the host
                q, sc = quantize_torch(part)
                self.tokens[k][f:f + t].copy_(q, non_blocking=non_blocking)
                self.scales[k][f:f + t].copy_(sc, non_blocking=non_blocking)
            else:
                self.tokens[k][f:f + t].copy_(part.to(self.tokens[k].dtype), non_blocking=non_blocking)
        self.labels[f:f + t] = labels[lo:hi]
        self.filled += t

    def payload(self):
        def value(k):
            if self.quant:
                return Quantized(self.tokens[k][: self.n].numpy(), self.scales[k][: self.n].numpy())
            return self.tokens[k][: self.n].numpy()

        layers = {k: value(k) for k in self.tokens if k != "final"}
        return layers, value("final"), self.labels[: self.n]


def request_memo_path(cache_root, rkey: str) -> Path:
    """Where a finished extraction notes its record under the request key (``inputs.request_key``)."""
    return Path(cache_root).resolve() / "requests" / f"{rkey}.json"


def _memo_hit(memo: Path, model_spec: dict, dataset_spec: dict, split: str) -> dict | None:
    """The record a finished extraction left under this request key, if its store is still there and
    complete and is the store the record names (its attributes carry the same content key). The
    request key covers every input the store key covers (docs/stages/extract.md, tests/test_keys.py),
    so the same request key means the same store; names (model, dataset and split: two splits with
the same definition share a store) are not keyed and come from this call."""
    try:
        record = json.loads(memo.read_text())
        store, key = record["store"], record["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not FeatureStore.is_complete(store):
        return None
    try:
        if json.loads((Path(store) / "zarr.json").read_text())["attributes"]["key"] != key:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**record, "model": model_spec.get("name"), "dataset": dataset_spec.get("name"), "split": split}


def _write_memo(memo: Path, record: dict) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, sort_keys=True, default=str))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache root: the next hit builds the model again, as before


def extract(model_spec: dict, dataset_spec: dict, split: str, cache_root, settings: dict) -> dict:
    # A cache hit is decided from the request key first, before any model is built (or its library
    # imported) and before the image scan: weights and manifest digests are memoised per file version.
    memo = request_memo_path(cache_root, request_key(model_spec, dataset_spec, split, settings))
    if (hit := _memo_hit(memo, model_spec, dataset_spec, split)) is not None:
        log(f"cache hit: {model_spec.get('name')} on {dataset_spec.get('name')}/{split} -> {hit['store']}")
        return hit
    record = _extract(model_spec, dataset_spec, split, cache_root, settings)
    _write_memo(memo, record)
    return record


def _extract(model_spec: dict, dataset_spec: dict, split: str, cache_root, settings: dict) -> dict:
    device = pick_device(settings.get("device", "auto"))
    # cheap checks first: every image decodes (or is skipped by on_bad_image: skip), before the model
    data = checked_split(open_split(dataset_spec, split), dataset_spec.get("on_bad_image", "error"),
                         cache_dir=Path(cache_root) / "scans", workers=max(2, int(settings.get("num_workers", 2))),
                         dataset=dataset_spec.get("name"))
    skipped = list(getattr(data, "skipped_ids", []))
    bb = model_from_spec(model_spec).to(device)
    tok = token_settings(settings)  # defaults filled in: the same values the content key sees
    layers = resolve_layers(tok["layers"], bb.depth)
    dtype, view, order_seed = tok["dtype"], tok["view"], tok["order_seed"]
    if view not in VIEWS:
        raise SystemExit(f"error: extract.view {view!r} is not one of {' | '.join(VIEWS)}")
    preprocess = bb.preprocess.for_view(view)  # what this model's images really go through
    order = image_order(len(data), order_seed)
    ids = data.image_ids()
    facts = bb.describe()
    parts = store_key_parts(bb, model_spec, data, settings)
    key = content_key(parts)
    path = store_path_for(cache_root, key)
    task = _task_attrs(data)
    record = {"store": str(path), "key": key, "model": model_spec.get("name"), "dataset": dataset_spec.get("name"),
              "split": split, "num_images": len(data), "layers": layers, "facts": facts,
              "num_classes": data.num_classes, "view": view, "order_seed": order_seed, **task,
              **({"skipped_images": skipped} if skipped else {})}
    if FeatureStore.is_complete(path):
        log(f"cache hit: {model_spec.get('name')} on {dataset_spec.get('name')}/{split} -> {path}")
        return record

    attrs = {"key": key, "key_parts": parts, "model_name": model_spec.get("name"), "model": facts,
             "dataset": {"name": dataset_spec.get("name"), "split": split, "manifest": data.digest(), "num_images": len(data),
                         "order_seed": order_seed},
             "view": view, "input_preprocess": preprocess.to_dict(),
             "num_classes": data.num_classes, **task, "versions": _versions(), "device": str(device),
             "skipped_images": skipped,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with StoreWriter(path, num_images=len(data), layers=layers, num_tokens=bb.num_tokens, width=bb.width,
                     dtype=dtype, chunk_size=int(settings.get("chunk_size", 256)), attrs=attrs,
                     compressor=settings.get("compressor", "none"), shard_size=settings.get("shard_size"),
                     lock_timeout=float(settings.get("lock_timeout", DEFAULT_LOCK_TIMEOUT)),
                     order=order, image_ids=[ids[int(i)] for i in order],  # row r holds image order[r]
                     **_label_layout(data, bb)) as writer:
        if writer.already_complete:
            log(f"cache hit: {path} was finished by another process while this one waited for it")
            return record
        pending = writer.pending_units()
        if len(pending) < writer.num_units:
            unit = "shards" if writer.shard_size else "chunks"
            log(f"resuming {path.name}: {writer.num_units - len(pending)} of {writer.num_units} {unit} already written")
        _run(bb, data, writer, pending, layers, device, settings, preprocess, order)
        writer.finalize()
    log(f"wrote {path}")
    return record


def _run(bb, data, writer: StoreWriter, pending: list[int], layers: list[int], device, settings: dict,
         preprocess, order: np.ndarray) -> None:
    if not pending:
        return
    import torch
    from tqdm import tqdm

    rows = [i for u in pending for i in range(*writer.unit_range(u))]
    on_cuda = device.type == "cuda"
    seg = getattr(data, "task", None) == SEGMENTATION  # masks get the image's resize / crop (nearest)
    loader = torch.utils.data.DataLoader(
        data.torch(preprocess.transform(), mask_transform(preprocess) if seg else None),
        batch_size=int(settings.get("batch_size", 256)),
        sampler=[int(order[r]) for r in rows],  # rows are filled in order; row r holds image order[r]
        num_workers=int(settings.get("num_workers", 2)),
        pin_memory=on_cuda, persistent_workers=False)
    dtype = writer.dtype
    capture = sorted(set(layers) | {bb.depth})
    keys = list(layers) + ["final"]
    bg = _Writer(writer, pool=2 if writer.shard_size else 3,
                 make_buffer=lambda: _UnitBuffer(writer.unit_size, keys, bb.num_tokens, bb.width, dtype, pin=on_cuda,
                                                 **_label_layout(data, bb)))
    bg.start()
    units = iter(pending)

    def next_buffer():
        u = next(units, None)
        if u is None:
            return None
        a, b = writer.unit_range(u)
        return bg.acquire().reset(u, b - a)

    itemsize = {"float16": 2, "float32": 4, "int8": 1}[dtype]
    bytes_per_image = (len(layers) + 1) * bb.num_tokens * (bb.width * itemsize + (4 if dtype == "int8" else 0))
    bar = tqdm(total=len(rows), unit="img", desc=f"extract {bb.spec['name']}", file=sys.stderr,
               mininterval=2.0, dynamic_ncols=True)
    t0 = time.time()
    try:
        buf = next_buffer()
        with torch.inference_mode():
            for pixels, labels, idx in loader:
                hs = bb.forward_layers(pixels.to(device, non_blocking=True), capture)
                outs = {l: hs[l] for l in layers}
                outs["final"] = bb.final_norm(hs[bb.depth])
                lab = labels.numpy() if seg else labels.numpy().astype(np.int64, copy=False)
                pos = 0
                while pos < len(lab):
                    take = min(len(lab) - pos, buf.remaining)
                    buf.add(outs, lab, pos, pos + take, non_blocking=on_cuda)
                    pos += take
                    if buf.remaining == 0:
                        if on_cuda:
                            buf.event = torch.cuda.Event()
                            buf.event.record()
                        bg.put(buf)
                        buf = next_buffer()
                bar.update(len(lab))
                elapsed = max(time.time() - t0, 1e-6)
                bar.set_postfix_str(f"{bar.n * bytes_per_image / elapsed / 1e6:.1f} MB/s", refresh=False)
    except BaseException:
        bar.close()
        bg.q.put(None)  # finish (and record) the units already handed over, then re-raise
        bg.join()
        raise
    bar.close()
    bg.join_checked()
    if buf is not None:
        raise RuntimeError(f"extract: unit {buf.unit} got {buf.filled} of {buf.n} images (data loader ended early)")


def _task_attrs(data) -> dict:
    """What the labels are: task, ignore index and (where the dataset has them) class names."""
    out = {"task": getattr(data, "task", "classification")}
    if out["task"] == SEGMENTATION:
        out["ignore_index"] = int(data.ignore_index)
    if getattr(data, "classes", None):
        out["classes"] = list(data.classes)
    return out


def _label_layout(data, bb) -> dict:
    """Classification: (N,) int64. Segmentation: (N, H, W) uint8 masks at the model's input size."""
    if getattr(data, "task", None) == SEGMENTATION:
        return {"label_shape": tuple(bb.preprocess.size), "label_dtype": np.uint8}
    return {"label_shape": (), "label_dtype": np.int64}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("stitchcache", "torch", "timm", "open_clip_torch", "transformers", "zarr"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---- CLI --------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-spec", required=True, help="JSON: a config models.<name> entry plus its name")
    p.add_argument("--dataset-spec", required=True, help="JSON: a config datasets.<name> entry plus its name")
    p.add_argument("--split", required=True)
    p.add_argument("--cache-root", required=True)
    p.add_argument("--settings", default="{}", help="JSON: the extract section plus seed/device")
    p.add_argument("--out", required=True, help="feature record JSON to write")


def main(args: argparse.Namespace) -> int:
    set_threads()
    try:
        record = extract(json_arg(args.model_spec, "--model-spec"), json_arg(args.dataset_spec, "--dataset-spec"),
                         args.split, args.cache_root, json_arg(args.settings, "--settings"))
    except (BadImages, StoreBusy) as e:
        raise SystemExit(f"error: {e}")
    write_json(args.out, record)
    return 0
