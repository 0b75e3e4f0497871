"""Checks of a model that need no weights and no data: run while the workflow plans (``snakemake -n``)
and by ``stitchcache plan``, before any job.

* ``model_facts(spec)``: builds the backbone on the ``meta`` device (no memory, no init, no weights read)
  from its library config (timm / open_clip built-ins, an open_clip model JSON, an HF ``config.json`` +
  ``preprocessor_config.json``) and returns its depth, width, token grid. Unknown libraries and
  architectures, misspelt constructor kwargs and missing HF directories fail here, as
  ``ModelCheckError(field, message)`` with ``field`` the ``models.<name>`` key to blame.
* ``checkpoint_problems(spec)``: the checkpoint's key / shape list (safetensors header, or
  ``torch.load(mmap=True, weights_only=True)``: nothing but the index is read) against the meta model's
  state dict: a checkpoint of another architecture (no key in common) or with tensors of other shapes.

Both are memoised per spec in the process, so the planner builds each model once, and on disk
(``$STITCHCACHE_FACTS_DIR``, default ``~/.cache/stitchcache/facts``), so an unchanged config's next dry
run builds no model and imports neither torch nor the model library (issue 15: about 3 s of every
``snakemake`` start). A memo's key holds everything its answer depends on: the spec, the installed
versions of torch and the model's library, a digest of this package's source, and for
``checkpoint_problems`` the stamp (device, inode, size, mtime, ctime: digest.py) of every weights
file. Only library built-in architectures are memoised on disk (``timm:`` and ``open_clip:`` names);
a spec read from local config files (an HF directory or hub snapshot, an open_clip JSON) is built
every time. Failures are never memoised.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..digest import memo_root, read_memo, stamp, write_memo
from . import _LIBRARIES, parse_name

FACTS_DIR_ENV = "STITCHCACHE_FACTS_DIR"
# the library's distribution, whose installed version a memo records (import name -> distribution)
_DISTRIBUTIONS = {"timm": "timm", "open_clip": "open_clip_torch", "hf": "transformers"}
_DISK_MEMO_LIBS = ("timm", "open_clip")

# keys a library may legitimately adapt while loading (resampled position / patch embeddings, heads)
_ADAPTED = ("pos_embed", "patch_embed.proj.weight", "positional_embedding", "position_embedding", "head.",
            "fc_norm.", "proj", "rope")
# prefixes checkpoints carry around the module the backend loads into
_PREFIXES = ("module.", "visual.", "vision_model.", "model.", "trunk.")


class ModelCheckError(ValueError):
    """A model that cannot be built as configured; ``field``: 'backbone', 'kwargs' or 'checkpoint'."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelFacts:
    backbone: str  # 'lib:arch' as built
    depth: int
    width: int
    patch_size: int
    image_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int
    source: str  # where the architecture came from (for messages: "timm's vit_large_... config")

    def as_grid_dict(self, name: str) -> dict:
        return {"name": name, "grid": list(self.grid), "patch_size": self.patch_size}


def _looks_like_path(arch: str) -> bool:
    return arch.startswith(("/", ".", "~")) or arch.count("/") > 1 or arch.endswith(".json")


def _build_meta(lib: str, arch: str, kwargs: dict, checkpoint: str | None, weights_here: bool = True):
    """The backbone with parameters on the meta device (raises the library's own errors).
    checkpoint: an HF weights directory (else None); weights_here: an HF model directory given as the
    architecture must hold the weights too (no checkpoint file names them)."""
    import importlib

    module = importlib.import_module(_LIBRARIES[lib])
    if lib == "hf" and checkpoint is None and (Path(os.path.expanduser(arch)).is_dir() or not _looks_like_path(arch)):
        from .hf_backend import _local_dir

        if "config" not in kwargs:
            d = _local_dir(arch)  # a directory, an offline hub snapshot, or None (a class name)
            if d is not None:
                return _hf_meta_from_dir(arch, d, kwargs, weights_here=weights_here)
    if lib == "hf" and checkpoint is not None and Path(checkpoint).expanduser().is_dir():
        return _hf_meta_from_dir(arch, Path(checkpoint).expanduser(), kwargs)
    if lib == "hf" and "config" not in kwargs:
        p = Path(os.path.expanduser(arch))
        if _looks_like_path(arch) and not p.exists():
            raise FileNotFoundError(f"HF model directory {str(p)!r} does not exist")
        raise ModelCheckError("backbone", f"hf:{arch}: without weights the architecture is unknown (HF reads it "
                              "from config.json next to the weights): give a save_pretrained directory or kwargs.config")
    import torch

    with torch.device("meta"):
        if lib == "open_clip":  # open_clip moves the model to `device` at the end of create_model
            return module.build(arch, checkpoint=None, device="meta", **kwargs)
        return module.build(arch, checkpoint=None, **kwargs)


def _build(lib: str, arch: str, kwargs: dict, checkpoint: str | None, weights_here: bool = True):
    """On the meta device; a library that cannot build there gets a real (CPU) random init instead.
    Library log lines of the build (open_clip's "no pretrained weights loaded") are silenced: loading
    no weights is the point here."""
    logging.disable(logging.WARNING)
    try:
        try:
            return _build_meta(lib, arch, kwargs, checkpoint, weights_here)
        except NotImplementedError as e:
            if "meta" not in str(e) or lib == "hf":
                raise
        from . import create_backbone

        return create_backbone(f"{lib}:{arch}", checkpoint=None, **kwargs)
    finally:
        logging.disable(logging.NOTSET)


def _hf_meta_from_dir(arch: str, d: Path, kwargs: dict, weights_here: bool = True):
    """HF: the model of ``d/config.json`` on meta, with the preprocessing ``build`` would read there.
    ``weights_here``: the directory is also where the weights must be (no separate checkpoint file)."""
    import transformers

    from . import hf_backend as hf

    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(d)!r} (expected a save_pretrained directory)")
    if weights_here and not (any(d.glob("*.safetensors")) or any(d.glob("*.bin"))):
        raise FileNotFoundError(f"no model.safetensors (or pytorch_model.bin) in {str(d)!r}")
    kwargs = dict(kwargs)
    image_size = kwargs.pop("image_size", None)
    kwargs.pop("dtype", None)
    cfg = hf._vision_config(transformers.AutoConfig.from_pretrained(str(d), local_files_only=True))
    for k, v in kwargs.items():
        if not hasattr(cfg, k):
            raise TypeError(f"{type(cfg).__name__} has no setting {k!r}")
        setattr(cfg, k, v)
    cls, family = hf._family_of(cfg, arch)
    import torch

    with torch.device("meta"):
        model = cls(cfg)
    preprocess = None
    processor = hf._load_processor(d)
    if processor is not None and family != "siglip2":
        preprocess = hf.preprocess_from_processor(processor)
        if image_size is not None and tuple(preprocess.size) != hf._as_pair(image_size):
            preprocess = None
    spec = {"name": f"hf:{arch}", "checkpoint": str(d), "kwargs": dict(kwargs)}
    return hf.HFBackbone(model, family, spec, image_size=image_size, preprocess=preprocess)


def _source(lib: str, arch: str, checkpoint: str | None) -> str:
    if lib == "hf" and checkpoint is not None:
        return f"{Path(checkpoint).expanduser()}/config.json"
    if lib == "hf" and Path(os.path.expanduser(arch)).is_dir():
        return f"{Path(arch).expanduser()}/config.json"
    if lib == "open_clip" and arch.endswith(".json"):
        return arch
    return f"{lib}'s {arch!r} config"


@functools.lru_cache(maxsize=None)
def _facts(spec_json: str) -> tuple[ModelFacts, object]:
    spec = json.loads(spec_json)
    backbone, kwargs = spec["backbone"], dict(spec.get("kwargs") or {})
    try:
        lib, arch = parse_name(backbone)
    except ValueError as e:
        raise ModelCheckError("backbone", str(e)) from None
    ckpt = spec.get("checkpoint")
    hf_dir = ckpt if lib == "hf" and ckpt is not None and Path(ckpt).expanduser().is_dir() else None
    try:
        bb = _build(lib, arch, kwargs, hf_dir, weights_here=ckpt is None)
    except ModelCheckError:
        raise
    except TypeError as e:  # a constructor kwarg the library does not take
        raise ModelCheckError("kwargs", f"{backbone} does not take these kwargs: {e}") from None
    except (FileNotFoundError, OSError) as e:
        raise ModelCheckError("checkpoint" if hf_dir else "backbone", str(e)) from None
    except Exception as e:  # unknown architecture (the library's message), bad kwarg values
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if " has no " in msg or "not supported" in msg or not kwargs:
            raise ModelCheckError("backbone", msg) from None
        raise ModelCheckError("kwargs", f"{backbone} cannot be built with kwargs {kwargs}: "
                              f"{type(e).__name__}: {msg}") from None
    facts = ModelFacts(backbone=backbone, depth=int(bb.depth), width=int(bb.width), patch_size=int(bb.patch_size),
                       image_size=tuple(int(s) for s in bb.image_size), grid=tuple(int(g) for g in bb.grid),
                       num_prefix_tokens=int(bb.num_prefix_tokens), source=_source(lib, arch, hf_dir))
    return facts, bb


def model_facts(spec: dict) -> ModelFacts:
    """spec: ``{backbone: 'lib:arch', kwargs, checkpoint}`` (registry names already resolved)."""
    sj = _spec_json(spec)
    memo = _memo_file("facts", sj)
    if memo is not None:
        known = read_memo(*memo)
        if isinstance(known, dict):
            try:
                return ModelFacts(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
            except TypeError:
                pass  # a memo of another field set: rebuild
    facts = _facts(sj)[0]
    if memo is not None:
        write_memo(*memo, dataclasses.asdict(facts), spec=json.loads(sj))
    return facts


def _is_builtin_name(arch: str) -> bool:
    """A plain registry name (``vit_small_patch16_224``): no hub or local-dir prefix (timm's
    ``hf-hub:`` reads a config from the hub cache), no path, and no file or folder of that name here
    (open_clip takes a directory given by a bare name)."""
    return (re.fullmatch(r"[A-Za-z0-9_.\-]+", arch) is not None and not _looks_like_path(arch)
            and not Path(arch).expanduser().exists())


def _memo_file(kind: str, spec_json: str, files: tuple = ()) -> tuple[Path, str] | None:
    """(memo file, key) of an answer about ``spec_json`` (and the weights ``files`` it read), or None
    when the spec is not memoised on disk (not a library built-in, or a library that is not installed)."""
    spec = json.loads(spec_json)
    try:
        lib, arch = parse_name(spec["backbone"])
    except ValueError:
        return None
    if lib not in _DISK_MEMO_LIBS or not _is_builtin_name(arch):
        return None
    try:
        versions = {d: importlib.metadata.version(d) for d in ("torch", _DISTRIBUTIONS[lib])}
        stamps = [[str(f), stamp(f.stat())] for f in files]
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    from ..provenance import code_digest, digest

    key = digest({"kind": kind, "spec": spec, "versions": versions, "files": stamps,
                  "code": code_digest("stitchcache.backends")})
    return memo_root(FACTS_DIR_ENV, "facts") / f"{kind}-{key[:32]}.json", key


def meta_backbone(spec: dict):
    """The (shared, memoised) meta-device backbone of ``spec``; do not move or modify it."""
    return _facts(_spec_json(spec))[1]


def _spec_json(spec: dict) -> str:
    return json.dumps({"backbone": spec["backbone"], "kwargs": spec.get("kwargs") or {},
                       "checkpoint": spec.get("checkpoint") if spec["backbone"].startswith("hf:") else None},
                      sort_keys=True, default=str)


# ---- checkpoints -------------------------------------------------------------------------------
def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """{key: shape} of a weights file without reading its tensors (None if the format hides them)."""
    p = Path(path).expanduser()
    st = p.stat()
    return _checkpoint_shapes(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _checkpoint_shapes(path: str, size: int, mtime: int) -> dict[str, tuple[int, ...]] | None:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # legacy (non-zip) torch files cannot be mapped, TorchScript archives: no check here
        return None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        return None
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _weights_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    files += sorted(path.glob("open_clip_*.safetensors")) if not files else []
    return files


def _strip(key: str, wanted: set, prefixes=_PREFIXES) -> str:
    changed = True
    while changed and key not in wanted:
        changed = False
        for pre in prefixes:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
                break
    return key


def _timm_filtered(bb, shapes: dict) -> dict:
    """timm's own pretrained filter (key conversion, position-embedding resampling) run on meta tensors."""
    import sys

    import torch

    model = getattr(bb, "model", None)
    mod = sys.modules.get(type(model).__module__) if model is not None else None
    fn = getattr(mod, "checkpoint_filter_fn", None)
    if fn is None:
        return shapes
    try:
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        out = fn(sd, model)
        return {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    except Exception:
        return shapes


def checkpoint_problems(spec: dict) -> list[str]:
    """What makes ``spec``'s checkpoint unloadable into its architecture, judged from key / shape lists
    alone: no key in common (weights of another architecture), or tensors of another shape."""
    ckpt = spec.get("checkpoint")
    if ckpt is None or not Path(ckpt).expanduser().exists():
        return []  # random init, or missing (reported as a missing input)
    files = tuple(_weights_files(Path(ckpt).expanduser()))
    memo = _memo_file("checkpoint", json.dumps({**json.loads(_spec_json(spec)), "checkpoint": str(ckpt)},
                                               sort_keys=True), files)
    known = read_memo(*memo) if memo is not None else None
    if isinstance(known, list):
        return known
    problems = _checkpoint_problems(spec, ckpt)
    if memo is not None:
        write_memo(*memo, problems)
    return problems


def _checkpoint_problems(spec: dict, ckpt) -> list[str]:
    bb = meta_backbone(spec)
    module = getattr(bb, "model", None) or getattr(bb, "visual", None) or bb
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    files = _weights_files(Path(ckpt).expanduser())
    have: dict = {}
    for f in files:
        shapes = checkpoint_shapes(f)
        if shapes is None:
            return []
        have.update(shapes)
    if not have:
        return []
    if spec["backbone"].startswith("timm:"):
        have = _timm_filtered(bb, have)
    prefixes = _PREFIXES + ((module.base_model_prefix + ".",) if getattr(module, "base_model_prefix", "") else ())
    have = {_strip(k, set(want), prefixes): s for k, s in have.items()}
    common = set(want) & set(have)
    where = ", ".join(str(f) for f in files)
    if not common:
        return [f"no tensor of {where} fits the architecture: none of its {len(have)} keys "
                f"(e.g. {sorted(have)[:3]}) is a key of the model (e.g. {sorted(want)[:3]}); weights of another "
                "architecture?"]
    bad = [k for k in sorted(common) if want[k] != have[k] and not any(k.startswith(a) for a in _ADAPTED)]
    if bad:
        shown = "; ".join(f"{k}: file {list(have[k])} vs model {list(want[k])}" for k in bad[:3])
        return [f"{len(bad)} tensor(s) of {where} have other shapes than the model's ({shown}"
                f"{'; ...' if len(bad) > 3 else ''}): the kwargs do not describe these weights"]
    return []
