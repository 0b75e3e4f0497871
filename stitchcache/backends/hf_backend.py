"""transformers ViTs: Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, SiglipVisionModel,
Siglip2VisionModel (fixed grid) and DINOv3ViTModel.

What each family does (transformers 5.x), and so what the primitives are:
  Dinov2Model / Dinov2WithRegistersModel
      h_0 = embeddings(x) (CLS [+ registers] + patches, positions added), blocks ``encoder.layer``,
      z = ``layernorm`` (== last_hidden_state).
  CLIPVisionModel (no ``.vision_model`` in 5.x)
      h_0 = pre_layrnorm(embeddings(x)) (== hidden_states[0]), blocks ``encoder.layers``,
      z = post_layernorm over ALL tokens (HF's last_hidden_state is NOT normed; it norms the pooled CLS only).
  SiglipVisionModel
      no prefix token; h_0 = embeddings(x), blocks ``encoder.layers``, z = post_layernorm (== last_hidden_state).
  Siglip2VisionModel (NaFlex)
      supported on a FIXED grid only: the image (B, C, H, W) is patchified the way Siglip2ImageProcessor
      does, ``spatial_shapes`` = the grid for every image and no padding (all-ones mask == no mask).
      Variable-resolution NaFlex batches are not supported; for the SigLIP2 paper model prefer the
      fixed-resolution checkpoints (``SiglipVisionModel``), ``timm:`` or ``open_clip:``.
  DINOv3ViTModel
      h_0 = embeddings(x) (CLS + registers + patches, no absolute positions); every layer takes
      ``position_embeddings`` = rope(cos, sin) computed from the pixel grid; the tail rebuilds them from
      the grid alone (``rope_embeddings`` only reads the input's height/width). z = ``norm``.

``arch`` (after ``hf:``) is a local directory written by ``save_pretrained``, a hub id that is already in
the local HF cache (resolved offline, never downloaded), or — with ``config=`` in kwargs — a class name /
model_type for a random-init model (tests). ``checkpoint=`` may name the weights directory (or a single
``model.safetensors`` whose config comes from ``arch`` / ``config=``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import Backbone, BackboneFacts, Preprocess
from .weights import WeightsNotFound, load_checked, load_state_dict, report_mismatch, require_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# model_type -> (model class, family)
_FAMILIES = {
    "dinov2": ("Dinov2Model", "dinov2"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "dinov2"),
    "clip": ("CLIPVisionModel", "clip"),
    "clip_vision_model": ("CLIPVisionModel", "clip"),
    "siglip": ("SiglipVisionModel", "siglip"),
    "siglip_vision_model": ("SiglipVisionModel", "siglip"),
    "siglip2": ("Siglip2VisionModel", "siglip2"),
    "siglip2_vision_model": ("Siglip2VisionModel", "siglip2"),
    "dinov3_vit": ("DINOv3ViTModel", "dinov3"),
}
_CLASS_TO_TYPE = {
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_with_registers",
    "CLIPVisionModel": "clip_vision_model",
    "SiglipVisionModel": "siglip_vision_model",
    "Siglip2VisionModel": "siglip2_vision_model",
    "DINOv3ViTModel": "dinov3_vit",
}

# Preprocessing when no image processor is saved with the model: each family's processor defaults
# (transformers 5.x class attributes), scaled to the model's image size.
#   mode 'shortest_hf': resize shorter side to round(size * resize_ratio), centre-crop size (floored offsets);
#   mode 'squash':  resize to (size, size).
_DEFAULT_PREPROCESS = {
    # BitImageProcessor as saved with facebook/dinov2-*: shortest_edge 256, crop 224, bicubic, ImageNet
    "dinov2": dict(mode="shortest_hf", ratio=256 / 224, interpolation="bicubic",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # CLIPImageProcessor: shortest_edge 224, crop 224, bicubic, OpenAI mean/std
    "clip": dict(mode="shortest_hf", ratio=1.0, interpolation="bicubic",
                 mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    # SiglipImageProcessor: resize to (size, size), bicubic, mean = std = 0.5
    "siglip": dict(mode="squash", ratio=1.0, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # Siglip2ImageProcessor: aspect-keeping resize to <= max_num_patches, bilinear, 0.5/0.5; on a fixed
    # square grid (and square images) that is a resize to (size, size)
    "siglip2": dict(mode="squash", ratio=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # DINOv3ViTImageProcessor: resize to (224, 224), bilinear, ImageNet
    "dinov3": dict(mode="squash", ratio=1.0, interpolation="bilinear",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _as_pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


class HFBackbone(Backbone):
    def __init__(self, model: torch.nn.Module, family: str, spec: dict, image_size=None, preprocess=None):
        super().__init__()
        self.model = model
        self.family = family
        self.spec = spec
        cfg = model.config
        patch = _as_pair(cfg.patch_size)[0]
        if family == "siglip2":
            side = int(round(cfg.num_patches ** 0.5)) * patch
            native = (side, side)
        else:
            native = _as_pair(cfg.image_size)
        img = _as_pair(image_size) if image_size is not None else (
            preprocess.size if preprocess is not None else native)
        if img[0] % patch or img[1] % patch:
            raise ValueError(f"{spec['name']}: image size {img} is not a multiple of the patch size {patch}")
        if family == "dinov2":
            prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        elif family == "dinov3":
            prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        elif family == "clip":
            prefix = 1
        else:
            prefix = 0
        if preprocess is None:
            preprocess = default_preprocess(family, img, int(getattr(cfg, "num_channels", 3)))
        if tuple(preprocess.size) != tuple(img):
            raise ValueError(f"{spec['name']}: preprocessing gives {preprocess.size} but the model is run at {img}")
        self.facts = BackboneFacts(
            depth=int(cfg.num_hidden_layers),
            width=int(cfg.hidden_size),
            patch_size=patch,
            image_size=img,
            num_prefix_tokens=prefix,
            preprocess=preprocess,
            extra={"architecture": type(model).__name__, "model_type": cfg.model_type},
        )
        if family == "siglip2":
            gh, gw = self.facts.grid
            if gh * gw > cfg.num_patches:
                raise ValueError(f"{spec['name']}: grid {gh}x{gw} exceeds the model's {cfg.num_patches} positions")
        self._rope = None

    # -- helpers -------------------------------------------------------------------------------
    @property
    def layers(self):
        m = self.model
        if self.family == "dinov2":
            return m.encoder.layer
        if self.family == "dinov3":
            return m.model.layer
        return m.encoder.layers

    def _patchify(self, pixels):
        """(B, C, H, W) -> (B, gh*gw, p*p*C), Siglip2ImageProcessor's ``convert_image_to_patches`` order."""
        b, c, h, w = pixels.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixels.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, p * p * c)

    def _rope_for(self, h):
        """DINOv3 rotary (cos, sin) for our grid; depends on the grid only."""
        dtype = self.model.embeddings.patch_embeddings.weight.dtype
        key = (h.device, dtype)
        if self._rope is None or self._rope[0] != key:
            H, W = self.image_size
            dummy = torch.empty((1, 1, H, W), device=h.device, dtype=dtype)
            self._rope = (key, self.model.rope_embeddings(dummy))
        return self._rope[1]

    # -- primitives ----------------------------------------------------------------------------
    def embed(self, pixels):
        m = self.model
        if self.family == "clip":
            return m.pre_layrnorm(m.embeddings(pixels))
        if self.family == "siglip2":
            patches = self._patchify(pixels)
            gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
            shapes = torch.tensor([[gh, gw]] * pixels.shape[0], dtype=torch.long, device=pixels.device)
            return m.embeddings(patches, shapes)
        if self.family == "dinov3":
            return m.embeddings(pixels.to(m.embeddings.patch_embeddings.weight.dtype))
        return m.embeddings(pixels)

    def block(self, i, h):
        layer = self.layers[i - 1]
        if self.family == "dinov2":
            return layer(h)
        if self.family == "dinov3":
            return layer(h, position_embeddings=self._rope_for(h))
        return layer(h, None)  # CLIP / SigLIP layers: attention_mask is positional; no mask

    def final_norm(self, h):
        m = self.model
        if self.family == "dinov2":
            return m.layernorm(h)
        if self.family == "dinov3":
            return m.norm(h)
        return m.post_layernorm(h)


def default_preprocess(family: str, size, channels: int = 3) -> Preprocess:
    from .open_clip_backend import make_preprocess

    d = _DEFAULT_PREPROCESS[family]
    size = _as_pair(size)
    return make_preprocess(size, d["mean"], d["std"], d["interpolation"], d["mode"],
                           resize=int(round(min(size) * d["ratio"])), channels=channels)


def preprocess_from_processor(proc) -> Preprocess:
    """An HF image processor (its saved settings) -> Preprocess giving the same tensors."""
    from .open_clip_backend import make_preprocess

    name = type(proc).__name__
    if "Siglip2" in name:
        raise ValueError("Siglip2ImageProcessor (NaFlex) has no fixed output size")
    size = getattr(proc, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    size = {k: v for k, v in size.items() if v is not None}
    do_resize = getattr(proc, "do_resize", True)
    do_crop = bool(getattr(proc, "do_center_crop", False))
    crop = getattr(proc, "crop_size", None) or {}
    crop = {k: v for k, v in dict(crop).items() if v is not None}
    if not do_resize:
        raise ValueError(f"{name}: do_resize=False gives no fixed input size")
    if "shortest_edge" in size:
        mode, resize = "shortest_hf", int(size["shortest_edge"])
        out = (int(crop["height"]), int(crop["width"])) if do_crop else None
        if out is None:
            raise ValueError(f"{name}: shortest_edge resize without a centre crop gives no fixed input size")
    elif "height" in size and "width" in size:
        mode, out = "squash", (int(size["height"]), int(size["width"]))
        resize = min(out)
        if do_crop and (int(crop["height"]), int(crop["width"])) != out:
            raise ValueError(f"{name}: resize to {out} followed by a crop to {crop} is not supported")
    else:
        raise ValueError(f"{name}: unsupported size setting {size}")
    resample = getattr(proc, "resample", 3)
    interp = _RESAMPLE.get(int(resample), None)
    if interp is None:
        raise ValueError(f"{name}: unsupported resample {resample!r}")
    if getattr(proc, "do_rescale", True) and abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(f"{name}: rescale_factor {proc.rescale_factor} is not 1/255")
    if getattr(proc, "do_normalize", True):
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return make_preprocess(out, mean, std, interp, mode, resize=resize)


def _config_from(config):
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    d = dict(config)
    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise ValueError(f"config has model_type {mt!r}; expected one of {sorted(_FAMILIES)}")
    return CONFIG_MAPPING[mt].from_dict(d)


def _vision_config(cfg):
    """A full CLIP/SigLIP config -> its vision config (we only build the image tower)."""
    if cfg.model_type in ("clip", "siglip", "siglip2"):
        return cfg.vision_config
    return cfg


def _family_of(cfg, arch: str):
    mt = cfg.model_type
    if arch in _CLASS_TO_TYPE and _FAMILIES[_CLASS_TO_TYPE[arch]][0] != _FAMILIES.get(mt, ("",))[0]:
        raise ValueError(f"hf:{arch} does not match a config of model_type {mt!r}")
    if mt not in _FAMILIES:
        raise ValueError(
            f"transformers model_type {mt!r} is not supported; supported: "
            + ", ".join(sorted({v[0] for v in _FAMILIES.values()}))
        )
    cls_name, family = _FAMILIES[mt]
    import transformers

    return getattr(transformers, cls_name), family


def _local_dir(arch: str) -> Path | None:
    """A local directory for ``arch``: the path itself, or the offline HF-cache snapshot of a hub id."""
    p = Path(os.path.expanduser(arch))
    if p.is_dir():
        return p
    if arch in _CLASS_TO_TYPE or arch in _FAMILIES or p.suffix:
        return None
    if arch.count("/") != 1 or arch.startswith(("/", ".", "~")):
        return None
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(arch, local_files_only=True))
    except Exception as e:  # not in the local cache: never try the network
        raise WeightsNotFound(
            f"hf model {arch!r}: not found in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "nothing is downloaded here. Either download it once elsewhere "
            f"(`huggingface-cli download {arch}`, then copy the cache or set HF_HOME), or save it with "
            "save_pretrained to a directory and pass that directory (hf:/path/to/dir or checkpoint=dir)."
        ) from e


def _load_processor(d: Path):
    if not (d / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(d), local_files_only=True, backend="pil")
    except TypeError:
        return AutoImageProcessor.from_pretrained(str(d), local_files_only=True)


# tensors of other towers/heads a full checkpoint carries (CLIPModel, SiglipModel) that the vision
# model rightly leaves out, and heads the tokens never use, which a vision-only file may lack
OTHER_TOWERS = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")
UNUSED_HEADS = ("head.", "pooler.")


def _check_loading(info: dict, what: str, where, strict: bool) -> None:
    """from_pretrained's loading info -> the same strict check as every other backend."""
    report_mismatch(what, where, [k for k in info.get("missing_keys") or () if not k.startswith(UNUSED_HEADS)],
                    [k for k in info.get("unexpected_keys") or () if not k.startswith(OTHER_TOWERS)], strict=strict,
                    mismatched=[k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()])


def build(arch: str, checkpoint: str | None = None, strict: bool = True, **kwargs) -> HFBackbone:
    """kwargs: ``config`` (a transformers config or its dict, random init), ``image_size`` (run the model
    at this size; positions are interpolated by the model itself), ``dtype`` (default float32), and
    config overrides when ``config`` is given."""
    import transformers

    spec_kwargs = dict(kwargs)
    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    image_size = kwargs.pop("image_size", None)
    dtype = kwargs.pop("dtype", "float32")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if config is not None and not isinstance(config, dict):
        spec_kwargs["config"] = config.to_dict()
    spec = {"name": f"hf:{arch}", "checkpoint": checkpoint, "kwargs": spec_kwargs}
    what = f"hf model {arch!r}"

    weights_dir: Path | None = None
    weights_file: Path | None = None
    if checkpoint is not None:
        p = require_path(
            checkpoint, what,
            hint="Pass checkpoint= a directory written by save_pretrained (config.json + model.safetensors), "
            "e.g. a hub snapshot of the model copied to this machine.",
        )
        if p.is_dir():
            weights_dir = p
        else:
            weights_file = p
    elif config is None:
        weights_dir = _local_dir(arch)
        if weights_dir is None:
            raise ValueError(
                f"{what}: not a local directory or hub id; for a random-init model pass config=<transformers "
                "config or dict with model_type>, for weights pass checkpoint=<dir>"
            )
        spec["checkpoint"] = str(weights_dir)  # the spec (and any digest of it) names the weights used

    processor = None
    if weights_dir is not None:
        if not (weights_dir / "config.json").is_file():
            raise WeightsNotFound(f"{what}: no config.json in {str(weights_dir)!r} (expected a save_pretrained directory)")
        cfg = _vision_config(transformers.AutoConfig.from_pretrained(str(weights_dir), local_files_only=True))
        cls, family = _family_of(cfg, arch)
        has_weights = any(weights_dir.glob("*.safetensors")) or any(weights_dir.glob("*.bin"))
        if not has_weights:
            raise WeightsNotFound(f"{what}: no model.safetensors (or pytorch_model.bin) in {str(weights_dir)!r}")
        model, info = cls.from_pretrained(
            str(weights_dir), local_files_only=True, dtype=torch_dtype, output_loading_info=True, **kwargs
        )
        _check_loading(info, what, weights_dir, strict)
        processor = _load_processor(weights_dir)
    else:
        if config is None:
            d = _local_dir(arch)
            if d is None or not (d / "config.json").is_file():
                raise ValueError(f"{what}: a single weights file needs config= or an arch directory with config.json")
            cfg = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
            processor = _load_processor(d)
        else:
            cfg = _config_from(config)
            for k, v in kwargs.items():
                setattr(cfg, k, v)
        cfg = _vision_config(cfg)
        cls, family = _family_of(cfg, arch)
        model = cls(cfg).to(torch_dtype)
        if weights_file is not None:
            sd = load_state_dict(weights_file)
            prefix = "vision_model."
            if any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            sd = {k: v for k, v in sd.items() if not k.startswith(OTHER_TOWERS)}
            load_checked(model, sd, what, weights_file, strict=strict, ignore_missing=lambda k: k.startswith(UNUSED_HEADS))

    preprocess = None
    if processor is not None and family != "siglip2":
        preprocess = preprocess_from_processor(processor)
        if image_size is not None and tuple(preprocess.size) != _as_pair(image_size):
            preprocess = None  # asked for another size: the family default at that size
    return HFBackbone(model, family, spec, image_size=image_size, preprocess=preprocess)
