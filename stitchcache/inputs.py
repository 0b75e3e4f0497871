"""What an experiment needs before any job runs: concrete model specs, the identity of their
weights and data, the request key that addresses a feature record in the shared cache root, and
a report of missing weights and datasets (with how to provide them).

The workflow (workflow/rules/common.smk) calls these while it builds the DAG, so nothing here
loads a model or reads an image:

* a model's weights are identified by their content digest (memoised per file by size and mtime,
  so a 1 GB checkpoint is hashed once), ``random-init`` without weights, or ``missing:<path>``;
* a dataset split by its manifest digest (the same digest the store's content key uses), or
  ``missing:<reason>`` when its files are not there.

The request key is a hash of those identities plus what extraction stores (layers, dtype) and the
library versions that decide preprocessing. The extract job still computes the store's full
content key; the request key only lets a second experiment *see* that the record exists and
schedule nothing.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import json
from dataclasses import dataclass
from pathlib import Path

from .cache.keys import EXTRACT_FORMAT_VERSION, content_key

REQUEST_KEY_LENGTH = 16
VERSIONED_PACKAGES = ("stitchcache", "torch", "timm", "open_clip_torch", "transformers")


@functools.lru_cache(maxsize=None)
def _library_versions() -> tuple:
    out = []
    for pkg in VERSIONED_PACKAGES:
        try:
            out.append((pkg, md.version(pkg)))
        except md.PackageNotFoundError:
            pass
    return tuple(out)


def library_versions() -> dict:
    return dict(_library_versions())


def concrete_model_spec(name: str, model: dict, weights_root: str | None = None,
                        checkpoint: str | None = None) -> dict:
    """A config ``models.<name>`` entry -> ``{name, backbone: 'lib:arch', kwargs, checkpoint}``.

    Registry names (``dinov2-l14``, ``clip-l14@open_clip``, ...) are resolved to their library
    architecture and their weights path under the weights root (which need not exist yet).
    ``checkpoint`` overrides the entry's own (the workflow passes the pretrain output)."""
    from .backends.registry import is_registered, resolve_model

    backbone = model["backbone"]
    kwargs = dict(model.get("kwargs") or {})
    ckpt = checkpoint if checkpoint is not None else model.get("checkpoint")
    if is_registered(backbone):
        resolved = resolve_model({"name": backbone, "checkpoint": ckpt, "kwargs": kwargs},
                                 weights_root=weights_root, require_weights=False)
        backbone, ckpt, kwargs = resolved["name"], resolved["checkpoint"], resolved["kwargs"]
    return {"name": name, "backbone": backbone, "kwargs": kwargs, "checkpoint": ckpt}


def weights_hint(model: dict, path: str) -> str:
    """How to provide a model's missing weights."""
    from .backends.registry import WEIGHTS_ROOT_ENV, get_entry, is_registered

    if is_registered(model["backbone"]):
        entry = get_entry(model["backbone"])
        return (f"get {entry['source']} on a machine with internet and put it at that path (or set "
                f"`weights_root:` / ${WEIGHTS_ROOT_ENV} to the folder holding '{entry['weights']}'); "
                "nothing is downloaded")
    return f"put the weights at {path} or point `checkpoint:` at them (null = random init)"


@functools.lru_cache(maxsize=None)
def _weights_identity(path: str | None) -> str:
    from .backends.weights import weights_digest

    if path is None:
        return "random-init"
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p}"
    return weights_digest(p)


def weights_identity(spec: dict) -> str:
    return _weights_identity(spec.get("checkpoint"))


@functools.lru_cache(maxsize=None)
def _split_identity(dataset_json: str, split: str) -> tuple[str, str | None]:
    """(manifest digest or 'missing:...', error message or None)."""
    from .data import open_split

    try:
        return open_split(json.loads(dataset_json), split).digest(), None
    except (FileNotFoundError, OSError, ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return f"missing:{msg}", msg


def split_identity(dataset: dict, split: str) -> tuple[str, str | None]:
    """dataset: a config ``datasets.<name>`` entry (with ``name``)."""
    return _split_identity(json.dumps(dataset, sort_keys=True), split)


def request_key(model_spec: dict, dataset: dict, split: str, extract: dict) -> str:
    """A short key of everything that decides a feature store (names left out)."""
    parts = {
        "format": EXTRACT_FORMAT_VERSION,
        "backbone": model_spec["backbone"],
        "kwargs": model_spec.get("kwargs") or {},
        "weights": weights_identity(model_spec),
        "dataset": {"type": dataset.get("type"), "split": dataset["splits"][split],
                    "manifest": split_identity(dataset, split)[0]},
        "layers": extract.get("layers", "all"),
        "dtype": extract.get("dtype", "float16"),
        "view": extract.get("view", "shared"),
        "order_seed": extract.get("order_seed", 0),
        "versions": library_versions(),
    }
    return content_key(parts)[:REQUEST_KEY_LENGTH]


def drop_if_stale(record: str | Path) -> bool:
    """Remove a feature record whose store is gone or incomplete (e.g. removed by hand); True if
    it was removed. Then Snakemake sees the record missing and schedules the extraction again."""
    from .cache.store import FeatureStore

    p = Path(record)
    if not p.exists():
        return False
    try:
        store = json.loads(p.read_text())["store"]
    except (OSError, ValueError, KeyError, TypeError):
        store = None
    if store is not None and FeatureStore.is_complete(store):
        return False
    p.unlink()
    return True


@dataclass(frozen=True)
class Missing:
    """One input that is not there: a model's weights or a dataset split's files."""

    kind: str  # "weights" | "data"
    name: str  # model or dataset name (with the split for data)
    what: str  # the path or the loader's message
    hint: str  # how to provide it

    def line(self) -> str:
        return f"  {self.kind:7} {self.name}: {self.what}\n          how: {self.hint}"


def data_hint(dataset: dict) -> str:
    """How to provide a missing dataset (the layout of each type: docs/stages/extract.md)."""
    return (f"put a copy of the data in the `{dataset.get('type')}` layout at the configured root "
            f"({dataset.get('root', 'datasets.' + str(dataset.get('name')) + '.root')}) - layouts in "
            "docs/stages/extract.md; nothing is downloaded")


def missing_inputs(models: dict[str, dict], datasets: dict[str, tuple[dict, list[str]]]) -> list[Missing]:
    """models: name -> concrete spec (checkpoint None = random init, skipped);
    datasets: name -> (dataset entry with name, splits used)."""
    out = []
    for name, spec in models.items():
        ident = weights_identity(spec)
        if ident.startswith("missing:"):
            out.append(Missing("weights", name, ident[len("missing:"):], spec.get("hint", "")))
    for name, (dataset, splits) in datasets.items():
        for split in splits:
            ident, err = split_identity(dataset, split)
            if err is not None:
                out.append(Missing("data", f"{name}/{split}", err, data_hint(dataset)))
    return out


def missing_report(missing: list[Missing]) -> str:
    models = sorted({m.name for m in missing if m.kind == "weights"})
    data = sorted({m.name for m in missing if m.kind == "data"})
    head = (f"stitchcache: {len(missing)} input(s) missing"
            + (f" - weights of {', '.join(models)}" if models else "")
            + (f" - data of {', '.join(data)}" if data else "")
            + ". The DAG is planned anyway; a real run stops before any job until they are provided.")
    return "\n".join([head] + [m.line() for m in missing])
