"""Training batches mix classes like an i.i.d. shuffle, although image folders are class-sorted
and the loader reads one chunk-sized block at a time (extraction writes rows in a seeded order)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from stitchcache.cache import FeatureStore, iter_batches
from stitchcache.data import open_split
from stitchcache.extract import extract

CLASSES, PER_CLASS, CHUNK, BATCH = 60, 8, 64, 32


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted") / "imgs"
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray((rng.random((8, 8)) * 255).astype("uint8"), mode="L").save(root / f"c{c:02d}" / f"{i}.png")
    return {"name": "sorted", "type": "image_folder", "root": str(root), "splits": {"train": {}}}


def mean_distinct(labels_per_batch) -> float:
    return float(np.mean([len(np.unique(y)) for y in labels_per_batch]))


def training_batches(store, epochs: int = 3):
    """Labels of every batch as the stitch trainer and the probes read them (shuffled blocks)."""
    out = []
    for epoch in range(epochs):
        for _, y in iter_batches([store.final, store.labels], BATCH, shuffle=True, seed=epoch):
            out.append(y.numpy())
    return out


def iid_reference(labels: np.ndarray, repeats: int = 200) -> float:
    rng = np.random.default_rng(1)
    return mean_distinct([p[i:i + BATCH] for _ in range(repeats)
                          for p in [labels[rng.permutation(len(labels))]] for i in range(0, len(labels), BATCH)])


def extract_store(spec, dataset, tmp_path, order_seed):
    model = {"name": "m", **tiny_vit(width=16, img=16, patch=8, depth=1)}
    rec = extract(model, dataset, "train", tmp_path / "cache",
                  {"chunk_size": CHUNK, "batch_size": 128, "num_workers": 0, "order_seed": order_seed})
    return FeatureStore(rec["store"])


def test_batches_of_a_class_sorted_folder_mix_classes_like_iid(sorted_folder, tmp_path):
    split = open_split(sorted_folder, "train")
    labels = np.array([split.label(i) for i in range(len(split))])
    assert split.num_classes == CLASSES and (np.diff(labels) >= 0).all()  # class-sorted on disk
    iid = iid_reference(labels)

    store = extract_store(None, sorted_folder, tmp_path, order_seed=0)
    assert store.num_images == CLASSES * PER_CLASS and store.labels.chunks[0] == CHUNK
    mixed = mean_distinct(training_batches(store))
    print(f"distinct classes per batch: seeded order {mixed:.2f}, i.i.d. {iid:.2f}")
    assert mixed >= 0.9 * iid, (mixed, iid)
    # the rows still say which image they hold
    assert [split.label(int(i)) for i in store.order] == list(store.labels[:])

    # without the seeded order (the dataset's own), a batch holds a handful of classes
    plain = mean_distinct(training_batches(extract_store(None, sorted_folder, tmp_path, order_seed=None)))
    print(f"dataset order {plain:.2f}")
    assert plain < 0.5 * iid, (plain, iid)
