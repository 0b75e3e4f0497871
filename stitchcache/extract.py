"""extract: one forward pass per batch captures h_0..h_L and the final tokens into a FeatureStore.

Resumable by chunk: finished chunks are skipped, so a killed job continues where it stopped.
Decoding/preprocessing run in DataLoader workers; chunk writes run in a background thread while
the next batches are computed.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .backends import create_backbone, weights_digest
from .cache import FeatureStore, StoreWriter, content_key, feature_key_parts
from .data import open_split
from .runtime import json_arg, log, pick_device, set_threads, write_json


def resolve_layers(setting, depth: int) -> list[int]:
    if setting in (None, "all"):
        return list(range(depth + 1))
    layers = sorted({int(l) for l in setting})
    bad = [l for l in layers if not 0 <= l <= depth]
    if bad:
        raise SystemExit(f"error: extract.layers {bad} outside 0..{depth} for this model")
    return layers


def model_from_spec(model_spec: dict):
    """A config ``models.<name>`` entry -> frozen Backbone (checkpoint paths made absolute, so the
    spec stored with features and stitch checkpoints rebuilds the model from anywhere)."""
    ckpt = model_spec.get("checkpoint")
    if ckpt is not None:
        ckpt = str(Path(ckpt).expanduser().resolve())
    return create_backbone(model_spec["backbone"], checkpoint=ckpt,
                           **(model_spec.get("kwargs") or {}))


def store_path_for(cache_root, key: str) -> Path:
    return Path(cache_root).resolve() / "features" / key[:24]


class _Writer(threading.Thread):
    """Writes finished chunks in the background (bounded queue: at most 2 chunks in flight)."""

    def __init__(self, writer: StoreWriter):
        super().__init__(daemon=True)
        self.writer, self.q, self.error = writer, queue.Queue(maxsize=2), None

    def run(self):
        while (item := self.q.get()) is not None:
            try:
                self.writer.write_chunk(*item)
            except BaseException as e:  # surfaced by put()/join_checked()
                self.error = e
                return

    def put(self, item):
        if self.error:
            raise self.error
        self.q.put(item)

    def join_checked(self):
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error


def extract(model_spec: dict, dataset_spec: dict, split: str, cache_root, settings: dict) -> dict:
    device = pick_device(settings.get("device", "auto"))
    bb = model_from_spec(model_spec).to(device)
    data = open_split(dataset_spec, split)
    layers = resolve_layers(settings.get("layers", "all"), bb.depth)
    dtype = settings.get("dtype", "float16")
    facts = bb.describe()
    parts = feature_key_parts(backbone_facts=facts, weights_digest=weights_digest(bb.spec.get("checkpoint")),
                              manifest_digest=data.digest(), layers=layers, dtype=dtype)
    key = content_key(parts)
    path = store_path_for(cache_root, key)
    record = {"store": str(path), "key": key, "model": model_spec.get("name"), "dataset": dataset_spec.get("name"),
              "split": split, "num_images": len(data), "layers": layers, "facts": facts,
              "num_classes": data.num_classes}
    if FeatureStore.is_complete(path):
        log(f"cache hit: {model_spec.get('name')} on {dataset_spec.get('name')}/{split} -> {path}")
        return record

    attrs = {"key": key, "key_parts": parts, "model_name": model_spec.get("name"), "model": facts,
             "dataset": {"name": dataset_spec.get("name"), "split": split, "manifest": data.digest(), "num_images": len(data)},
             "num_classes": data.num_classes, "versions": _versions(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with StoreWriter(path, num_images=len(data), layers=layers, num_tokens=bb.num_tokens, width=bb.width,
                     dtype=dtype, chunk_size=int(settings.get("chunk_size", 256)), attrs=attrs,
                     compressor=settings.get("compressor", "none")) as writer:
        pending = writer.pending_chunks()
        if len(pending) < writer.num_chunks:
            log(f"resuming {path.name}: {writer.num_chunks - len(pending)} of {writer.num_chunks} chunks already written")
        _run(bb, data, writer, pending, layers, device, settings)
        writer.finalize()
    log(f"wrote {path}")
    return record


def _run(bb, data, writer: StoreWriter, pending: list[int], layers: list[int], device, settings: dict) -> None:
    if not pending:
        return
    indices = [i for ci in pending for i in range(*writer.chunk_range(ci))]
    loader = torch.utils.data.DataLoader(
        data.torch(bb.preprocess.transform()), batch_size=int(settings.get("batch_size", 256)),
        sampler=indices, num_workers=int(settings.get("num_workers", 2)),
        pin_memory=device.type == "cuda", persistent_workers=False)
    np_dtype = np.float16 if writer.group.attrs["dtype"] == "float16" else np.float32
    capture = sorted(set(layers) | {bb.depth})
    bg = _Writer(writer)
    bg.start()
    chunk_iter = iter(pending)
    ci = next(chunk_iter)
    a, b = writer.chunk_range(ci)
    buf = _ChunkBuffer(b - a)
    bytes_per_image = (len(layers) + 1) * bb.num_tokens * bb.width * np.dtype(np_dtype).itemsize
    bar = tqdm(total=len(indices), unit="img", desc=f"extract {bb.spec['name']}", file=sys.stderr,
               mininterval=2.0, dynamic_ncols=True)
    t0 = time.time()
    with torch.inference_mode():
        for pixels, labels, idx in loader:
            hs = bb.forward_layers(pixels.to(device, non_blocking=True), capture)
            z = bb.final_norm(hs[bb.depth])
            out = {l: hs[l].to("cpu", torch.float32).numpy().astype(np_dtype) for l in layers}
            fin = z.to("cpu", torch.float32).numpy().astype(np_dtype)
            lab = labels.numpy().astype(np.int64)
            pos = 0
            while pos < len(lab):
                take = min(len(lab) - pos, buf.remaining)
                buf.add({l: v[pos:pos + take] for l, v in out.items()}, fin[pos:pos + take], lab[pos:pos + take])
                pos += take
                if buf.remaining == 0:
                    bg.put((ci, *buf.arrays()))
                    ci = next(chunk_iter, None)
                    if ci is not None:
                        a, b = writer.chunk_range(ci)
                        buf = _ChunkBuffer(b - a)
            bar.update(len(lab))
            elapsed = max(time.time() - t0, 1e-6)
            bar.set_postfix_str(f"{bar.n * bytes_per_image / elapsed / 1e6:.1f} MB/s", refresh=False)
    bar.close()
    bg.join_checked()


class _ChunkBuffer:
    def __init__(self, size: int):
        self.size, self.parts = size, []
        self.filled = 0

    @property
    def remaining(self) -> int:
        return self.size - self.filled

    def add(self, layers, final, labels):
        self.parts.append((layers, final, labels))
        self.filled += len(labels)

    def arrays(self):
        layers = {l: np.concatenate([p[0][l] for p in self.parts]) for l in self.parts[0][0]}
        return layers, np.concatenate([p[1] for p in self.parts]), np.concatenate([p[2] for p in self.parts])


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
    record = extract(json_arg(args.model_spec, "--model-spec"), json_arg(args.dataset_spec, "--dataset-spec"),
                     args.split, args.cache_root, json_arg(args.settings, "--settings"))
    write_json(args.out, record)
    return 0
