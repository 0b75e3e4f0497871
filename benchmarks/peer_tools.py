"""The peer extractors of ``benchmarks/peers.py``, each run as a whole process:

  python benchmarks/peer_tools.py {naive|thingsvision|torchlens} --job JOB.json

It runs in the peer's own Python (a venv without stitchcache is fine: it imports only torch, timm,
torchvision, PIL, numpy and the peer). The job file names the timm architecture and its kwargs, the
checkpoint every tool loads, the image paths in order, the normalisation (the PNGs are written at the
model's input size, so preprocessing is to-tensor + normalise in every tool), the batch size, the
modules to capture (every block and the final norm), the torch threads and the output folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def load_model(job: dict) -> torch.nn.Module:
    import timm

    model = timm.create_model(job["arch"], pretrained=False, **job["kwargs"])
    model.load_state_dict(torch.load(job["checkpoint"], map_location="cpu", weights_only=True))
    return model.eval()


def transform(job: dict) -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(job["mean"], job["std"])])


def run_naive(job: dict) -> None:
    """The ten-line loop: decode a batch, timm ``forward_intermediates``, one np.save per block."""
    model, tf, out, paths, B = load_model(job), transform(job), Path(job["out"]), job["images"], job["batch"]
    out.mkdir(parents=True, exist_ok=True)
    for b in range(0, len(paths), B):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[b:b + B]])
        with torch.inference_mode():
            final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        for j, (patches, prefix) in enumerate(inter):
            np.save(out / f"blocks.{j}_{b:07d}.npy", torch.cat([prefix, patches], 1).numpy())
        np.save(out / f"norm_{b:07d}.npy", final.numpy())


def run_thingsvision(job: dict) -> None:
    """thingsvision's extractor around the same model, its ImageDataset / DataLoader, features to disk.
    Versions whose ``extract_features`` takes one ``module_name`` run one pass per module."""
    from thingsvision import get_extractor_from_model
    from thingsvision.utils.data import DataLoader, ImageDataset

    model, tf, out = load_model(job), transform(job), Path(job["out"])
    paths = [Path(p) for p in job["images"]]
    root = paths[0].parent  # one flat folder: an "instance dataset" in thingsvision's terms
    out.mkdir(parents=True, exist_ok=True)
    for m in job["modules"]:
        (out / m).mkdir(exist_ok=True)
    extractor = get_extractor_from_model(model=model, device="cpu", backend="pt", preprocess=tf)
    dataset = ImageDataset(root=str(root), out_path=str(out), backend="pt", transforms=tf,
                           file_names=[p.name for p in paths])
    batches = DataLoader(dataset=dataset, batch_size=job["batch"], backend="pt")
    try:
        extractor.extract_features(batches=batches, module_names=job["modules"], flatten_acts=False,
                                   output_type="ndarray", output_dir=str(out))
    except TypeError:  # no module_names in this version
        for m in job["modules"]:
            extractor.extract_features(batches=batches, module_name=m, flatten_acts=False,
                                       output_type="ndarray", output_dir=str(out / m))


def run_torchlens(job: dict) -> None:
    """torchlens ``extract_dataset`` to disk (safetensors shards, one per batch), resumable."""
    import torchlens as tl

    model, tf, paths = load_model(job), transform(job), job["images"]

    class Images:  # an iterable of decoded images (torchlens batches them)
        def __len__(self) -> int:
            return len(paths)

        def __iter__(self):
            for p in paths:
                yield tf(Image.open(p).convert("RGB"))

    tl.extract_dataset(model, Images(), layers=job["modules"], batch_size=job["batch"], output_dir=job["out"],
                       progress=False, resume=bool(job.get("resume")))


TOOLS = {"naive": run_naive, "thingsvision": run_thingsvision, "torchlens": run_torchlens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tool", choices=sorted(TOOLS))
    ap.add_argument("--job", required=True, help="JSON job file (see the module doc)")
    args = ap.parse_args()
    job = json.loads(Path(args.job).read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    TOOLS[args.tool](job)


if __name__ == "__main__":
    main()
