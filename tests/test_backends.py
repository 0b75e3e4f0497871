"""Backbone adapters are exact to each library (timm, open_clip, transformers) on tiny random-init models.

For every family: forward_layers(x) == the library's own intermediates, final tokens == the library's
normed output, forward_from(h_l, l) == forward(x) for every l; a saved checkpoint reloads through
create_backbone(checkpoint=...) with identical outputs; missing weights name the path; preprocessing
equals the library's own transform on a PIL image. Nothing is downloaded.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stitchcache.backends import WeightsNotFound, backbone_from_spec, create_backbone
from stitchcache.backends import registry
from stitchcache.backends.registry import check_grids, image_size_for_grid, resolve_model

IMG, PATCH, WIDTH, DEPTH = 32, 8, 32, 2
TINY_TIMM = dict(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=2)


# a tiny SigLIP-style timm ViT (no prefix token, MAP pooling) for open_clip's TimmModel tower
def _register_tiny_siglip():
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if "stitchcache_test_tiny_siglip" in timm.list_models("stitchcache_test_*"):
        return

    @register_model
    def stitchcache_test_tiny_siglip(pretrained=False, **kwargs):
        args = dict(TINY_TIMM, class_token=False, global_pool="map")
        return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=pretrained, **dict(args, **kwargs))


_register_tiny_siglip()


def _open_clip_configs(root):
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    vit = {"embed_dim": 16, "vision_cfg": {"image_size": IMG, "layers": DEPTH, "width": WIDTH, "patch_size": PATCH,
                                           "head_width": 16}, "text_cfg": text}
    sig = {"embed_dim": WIDTH, "custom_text": True,
           "vision_cfg": {"image_size": IMG, "timm_model_name": "stitchcache_test_tiny_siglip",
                          "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": dict(text, width=WIDTH)}
    paths = {}
    for name, cfg in (("StitchTinyViT", vit), ("StitchTinySigLIP", sig)):
        p = root / f"{name}.json"
        p.write_text(json.dumps(cfg))
        paths[name] = str(p)
    return paths


_HF_COMMON = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2,
                  image_size=IMG, patch_size=PATCH)
HF_CONFIGS = {
    "Dinov2Model": dict(model_type="dinov2", **_HF_COMMON),
    "Dinov2WithRegistersModel": dict(model_type="dinov2_with_registers", num_register_tokens=4, **_HF_COMMON),
    "CLIPVisionModel": dict(model_type="clip_vision_model", **_HF_COMMON),
    "SiglipVisionModel": dict(model_type="siglip_vision_model", **_HF_COMMON),
    "Siglip2VisionModel": dict(model_type="siglip2_vision_model", num_patches=(IMG // PATCH) ** 2,
                               **{k: v for k, v in _HF_COMMON.items() if k != "image_size"}),
    "DINOv3ViTModel": dict(model_type="dinov3_vit", num_register_tokens=4, **_HF_COMMON),
}

# family id -> (name, kwargs, expected number of prefix tokens)
FAMILIES = {
    "timm-vit": ("timm:vit_small_patch16_224", TINY_TIMM, 1),
    "timm-reg4-dinov2": ("timm:vit_small_patch14_reg4_dinov2", TINY_TIMM, 5),
    "timm-dinov3-rope": ("timm:vit_small_patch16_dinov3", TINY_TIMM, 5),
    "timm-siglip": ("timm:vit_base_patch16_siglip_224", dict(TINY_TIMM, class_token=False, global_pool="map"), 0),
    "open_clip-vit": ("open_clip:{StitchTinyViT}", {}, 1),
    "open_clip-vit-seqfirst": ("open_clip:{StitchTinyViT}", {}, 1),
    "open_clip-siglip-timm": ("open_clip:{StitchTinySigLIP}",
                              {"force_preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}},
                              0),
    **{f"hf-{k}": (f"hf:{k}", {"config": v}, {"Dinov2Model": 1, "Dinov2WithRegistersModel": 5, "CLIPVisionModel": 1,
                                              "DINOv3ViTModel": 5}.get(k, 0))
       for k, v in HF_CONFIGS.items()},
}


@pytest.fixture(scope="module")
def oc_paths(tmp_path_factory):
    return _open_clip_configs(tmp_path_factory.mktemp("open_clip_cfg"))


def _make(fid, oc_paths):
    name, kwargs, _ = FAMILIES[fid]
    bb = create_backbone(name.format(**oc_paths), **kwargs)
    if fid == "open_clip-vit-seqfirst":
        _make_sequence_first(bb)
    return bb


def _make_sequence_first(bb):
    """Swap in a sequence-first open_clip Transformer (older configs) with the same weights."""
    from open_clip.transformer import Transformer

    old = bb.visual.transformer
    new = Transformer(old.width, old.layers, heads=2, mlp_ratio=4.0, batch_first=False)
    new.load_state_dict(old.state_dict())
    bb.visual.transformer = new.eval()
    assert bb.visual.transformer.batch_first is False


def _lib_reference(bb, x):
    """The library's own {l: h_l} (whatever it exposes) and its normed final tokens."""
    kind = bb.spec["name"].split(":", 1)[0]
    timm_model = getattr(bb, "model", None) if type(bb).__name__ == "TimmBackbone" else None
    if timm_model is not None:
        final, inter = timm_model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC")
        # with prefix tokens timm returns (spatial, prefix) pairs, without them plain tensors
        layers = {i + 1: (torch.cat([t[1], t[0]], 1) if isinstance(t, tuple) else t) for i, t in enumerate(inter)}
        assert torch.equal(final, timm_model.forward_features(x))
        return layers, final
    if kind == "open_clip":
        v = bb.visual
        h0 = v._embeds(x)
        last, inter = v.transformer.forward_intermediates(h0)
        layers = {0: h0, **{i + 1: t for i, t in enumerate(inter)}}
        # open_clip's own VisionTransformer.forward_intermediates: patch tokens (+ CLS as extra tokens)
        out = v.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        for i, (pt, ct) in enumerate(zip(out["image_intermediates"], out["image_intermediates_prefix"])):
            assert torch.equal(torch.cat([ct, pt], 1), layers[i + 1])
        return layers, v.ln_post(v.transformer(h0))
    m = bb.model
    if bb.family == "siglip2":
        gh, gw = bb.grid
        out = m(pixel_values=bb._patchify(x), pixel_attention_mask=torch.ones(x.shape[0], gh * gw, dtype=torch.long),
                spatial_shapes=torch.tensor([[gh, gw]] * x.shape[0]), output_hidden_states=True)
    else:
        out = m(pixel_values=x, output_hidden_states=True)
    layers = dict(enumerate(out.hidden_states))
    final = m.post_layernorm(out.last_hidden_state) if bb.family == "clip" else out.last_hidden_state
    return layers, final


@pytest.mark.parametrize("fid", list(FAMILIES))
def test_exact_to_library(fid, oc_paths):
    torch.manual_seed(1)
    bb = _make(fid, oc_paths)
    x = torch.randn(2, 3, IMG, IMG)
    assert bb.depth == DEPTH and bb.width == WIDTH and bb.patch_size == PATCH
    assert bb.num_prefix_tokens == FAMILIES[fid][2]
    assert bb.grid == (IMG // PATCH, IMG // PATCH)
    with torch.no_grad():
        ours = bb.forward_layers(x)
        ref_layers, ref_final = _lib_reference(bb, x)
        assert sorted(ours) == list(range(DEPTH + 1))
        for l, h in ref_layers.items():
            assert h.shape == (2, bb.num_tokens, WIDTH)
            torch.testing.assert_close(ours[l], h, rtol=0, atol=1e-6, msg=f"{fid}: h_{l} differs from the library")
        z = bb(x)
        torch.testing.assert_close(z, ref_final, rtol=0, atol=1e-6)
        for l in range(DEPTH + 1):
            torch.testing.assert_close(bb.forward_from(ours[l], l), z, rtol=0, atol=1e-6)
        assert set(bb.forward_layers(x, [1])) == {1}


def _save(bb, fid, tmp_path):
    """Write the model's weights the way its library stores them; -> (name, checkpoint, kwargs)."""
    name, kwargs, _ = FAMILIES[fid]
    kwargs = dict(kwargs)
    if fid.startswith("timm"):
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
        return name, str(path), kwargs
    if fid.startswith("open_clip"):
        path = tmp_path / "open_clip_pytorch_model.bin"
        sd = ({f"visual.{k}": v for k, v in bb.visual.state_dict().items()} if hasattr(bb, "visual")
              else {f"visual.trunk.{k}": v for k, v in bb.model.state_dict().items()})
        sd["logit_scale"] = torch.ones(())  # a full CLIP checkpoint carries text-tower keys too
        torch.save(sd, path)
        return name, str(path), kwargs
    d = tmp_path / "hf_model"
    bb.model.save_pretrained(d)
    proc = _hf_processor(bb.family)
    if proc is not None:
        proc.save_pretrained(d)
    kwargs.pop("config")
    return name, str(d), kwargs


@pytest.mark.parametrize("fid", [f for f in FAMILIES if f != "open_clip-vit-seqfirst"])
def test_checkpoint_roundtrip_and_missing_weights(fid, oc_paths, tmp_path):
    torch.manual_seed(2)
    bb = _make(fid, oc_paths)
    with torch.no_grad():  # perturb so that reloaded weights cannot coincide with the seeded random init
        for p in bb.parameters():
            p.add_(0.01 * torch.randn_like(p))
    name, ckpt, kwargs = _save(bb, fid, tmp_path)
    x = torch.randn(2, 3, IMG, IMG)
    bb2 = create_backbone(name.format(**oc_paths), checkpoint=ckpt, **kwargs)
    bb3 = backbone_from_spec(json.loads(json.dumps(bb2.spec)))  # the spec is JSON and rebuilds the model
    with torch.no_grad():
        z = bb(x)
        torch.testing.assert_close(bb2(x), z, rtol=0, atol=0)
        torch.testing.assert_close(bb3(x), z, rtol=0, atol=0)
    assert bb2.describe() == bb3.describe()
    if fid.startswith("hf"):  # a save_pretrained directory is also a valid arch on its own
        bb4 = create_backbone(f"hf:{ckpt}")
        assert bb4.spec["checkpoint"] == ckpt
        torch.testing.assert_close(bb4(x), z, rtol=0, atol=0)

    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(WeightsNotFound, match=str(missing)):
        create_backbone(name.format(**oc_paths), checkpoint=str(missing), **kwargs)


# ---- preprocessing equals each library's own transform ------------------------------------------------------
def _pil_image(w=45, h=38):
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (w + h)], -1)
    arr = arr + 20 * np.sin(xx / 3.0)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype("uint8"), "RGB")


def _hf_processor(family, backend="pil"):
    """The family's own image processor at our tiny size (same settings the family default uses)."""
    import transformers as tr

    suffix = "Pil" if backend == "pil" else ""
    if suffix and not hasattr(tr, {"dinov2": "Bit", "clip": "CLIP", "siglip": "Siglip",
                                   "dinov3": "DINOv3ViT"}.get(family, "None") + "ImageProcessorPil"):
        suffix = ""  # DINOv3 has a torchvision processor only
    if family == "dinov2":
        return getattr(tr, "BitImageProcessor" + suffix)(
            size={"shortest_edge": round(IMG * 256 / 224)}, crop_size={"height": IMG, "width": IMG},
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if family == "clip":
        return getattr(tr, "CLIPImageProcessor" + suffix)(size={"shortest_edge": IMG},
                                                          crop_size={"height": IMG, "width": IMG})
    if family == "siglip":
        return getattr(tr, "SiglipImageProcessor" + suffix)(size={"height": IMG, "width": IMG})
    if family == "dinov3":
        return getattr(tr, "DINOv3ViTImageProcessor" + suffix)(size={"height": IMG, "width": IMG})
    return None


def _timm_transform(bb):
    import timm.data

    cfg = timm.data.resolve_model_data_config(bb.model)
    cfg["input_size"] = (3, IMG, IMG)  # the size the tiny model was built for
    return timm.data.create_transform(**cfg, is_training=False)


@pytest.mark.parametrize("fid", [f for f in FAMILIES if f != "open_clip-vit-seqfirst"])
def test_preprocessing_matches_library(fid, oc_paths, tmp_path):
    img = _pil_image()
    if fid.startswith("open_clip"):
        import open_clip
        from open_clip.transform import PreprocessCfg

        name, kwargs, _ = FAMILIES[fid]
        bb = _make(fid, oc_paths)  # registers the config JSON
        model = open_clip.create_model(name.split(":", 1)[1].format(**oc_paths).rsplit("/", 1)[1][:-5],
                                       pretrained=None, force_preprocess_cfg=kwargs.get("force_preprocess_cfg"))
        ref = open_clip.transform.image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(img)
        torch.testing.assert_close(bb.preprocess.transform()(img), ref, rtol=0, atol=0)
        return
    if fid.startswith("timm"):
        bb = _make(fid, oc_paths)
        ref = _timm_transform(bb)(img)
        torch.testing.assert_close(bb.preprocess.transform()(img), ref, rtol=0, atol=0)
        return
    bb = _make(fid, oc_paths)  # random init: the family default (no processor saved)
    if bb.family == "siglip2":  # NaFlex processor: equal on a square image whose patch budget is our grid
        import transformers as tr

        sq = _pil_image(40, 40)
        proc = tr.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=(IMG // PATCH) ** 2)
        out = proc(images=sq, return_tensors="pt")
        assert out["spatial_shapes"].tolist() == [list(bb.grid)]
        ours = bb._patchify(bb.preprocess.transform()(sq)[None])
        torch.testing.assert_close(ours, out["pixel_values"], rtol=0, atol=1e-5)
        return
    ours_default = bb.preprocess.transform()(img)
    for backend in ("pil", "torchvision"):
        proc = _hf_processor(bb.family, backend)
        # PIL processors resize exactly like torchvision-on-PIL; tensor resizing differs by rounding only
        atol = 1e-5 if type(proc).__name__.endswith("Pil") else 0.15
        ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours_default, ref, rtol=0, atol=atol, msg=f"{fid} default vs {backend}")
    # and the processor saved with the weights is read back into the same Preprocess
    name, ckpt, kwargs = _save(bb, fid, tmp_path)
    bb2 = create_backbone(name, checkpoint=ckpt, **kwargs)
    assert bb2.preprocess == bb.preprocess


# ---- registry, grids, errors -----------------------------------------------------------------------------------
def test_image_size_for_grid_and_check_grids():
    assert image_size_for_grid(14) == 224 and image_size_for_grid(16) == 256
    assert image_size_for_grid(8, grid=4) == 32
    for model in registry.PAPER_MODELS:
        for key, e in registry.REGISTRY.items():
            if key.startswith(model + "@"):
                assert e["grid"] == [16, 16] and e["image_size"] == image_size_for_grid(e["patch_size"])
    a = create_backbone("timm:vit_small_patch16_224", **TINY_TIMM)
    b = create_backbone("timm:vit_small_patch16_224", **dict(TINY_TIMM, patch_size=4))
    assert check_grids(a, a.describe()) == (4, 4)
    with pytest.raises(ValueError, match="token grids differ"):
        check_grids(a, b)


def test_registry_names_resolve_to_local_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(registry.WEIGHTS_ROOT_ENV, raising=False)
    # all four paper models, for each library that provides them
    for model in registry.PAPER_MODELS:
        libs = {k.split("@")[1] for k in registry.REGISTRY if k.startswith(model + "@")}
        assert "timm" in libs and "hf" in libs
    assert {"clip-l14@open_clip", "siglip2-l16@open_clip"} <= set(registry.REGISTRY)
    for key, e in registry.REGISTRY.items():
        spec = resolve_model(key, weights_root=tmp_path, require_weights=False)
        assert spec["name"] == e["backbone"] and spec["checkpoint"] == str(tmp_path / e["weights"])
        with pytest.raises(WeightsNotFound) as err:  # nothing there: the error names the file and its source
            resolve_model(key, weights_root=tmp_path)
        assert str(tmp_path / e["weights"]) in str(err.value) and "huggingface.co" in str(err.value)
        with pytest.raises(WeightsNotFound, match=str(tmp_path / e["weights"])):
            create_backbone(key, weights_root=str(tmp_path))
    monkeypatch.setenv(registry.WEIGHTS_ROOT_ENV, str(tmp_path / "env_root"))
    assert resolve_model("dinov2-l14", require_weights=False)["checkpoint"].startswith(str(tmp_path / "env_root"))
    # library names pass through; a spec dict keeps its own checkpoint
    assert resolve_model("timm:vit_small_patch16_224") == {"name": "timm:vit_small_patch16_224",
                                                           "checkpoint": None, "kwargs": {}}
    spec = resolve_model({"name": "clip-l14@open_clip", "checkpoint": "/x.bin"})
    assert spec == {"name": "open_clip:ViT-L-14", "checkpoint": "/x.bin", "kwargs": {"tag": "openai"}}


def test_registry_entry_builds_from_weights_root(tmp_path):
    """A registry entry whose file is present loads it (timm paper entry, tiny stand-in weights)."""
    e = registry.get_entry("dinov2-l14@timm")
    bb = create_backbone("timm:vit_small_patch14_dinov2", **TINY_TIMM)
    from safetensors.torch import save_file

    path = tmp_path / e["weights"]
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    # same file layout and lookup as the paper entry; a tiny architecture stands in for ViT-L
    spec = resolve_model("dinov2-l14@timm", weights_root=tmp_path)
    assert spec["checkpoint"] == str(path)
    bb2 = create_backbone("timm:vit_small_patch14_dinov2", checkpoint=spec["checkpoint"], **TINY_TIMM)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(bb2(x), bb(x), rtol=0, atol=0)


def test_hf_hub_id_is_offline_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFound, match="local Hugging Face cache"):
        create_backbone("hf:facebook/dinov2-large")


def test_hf_vision_tower_from_full_clip_dir(tmp_path):
    """A full CLIPModel directory (text + vision) gives the vision tower, exact to CLIPVisionModel."""
    import transformers as tr

    vc = {k: v for k, v in HF_CONFIGS["CLIPVisionModel"].items() if k != "model_type"}
    cfg = tr.CLIPConfig(vision_config=vc, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=64,
                                                           bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        projection_dim=16)
    torch.manual_seed(3)
    full = tr.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    bb = create_backbone("hf:CLIPVisionModel", checkpoint=str(tmp_path / "clip"))
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        out = full.vision_model(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(bb(x), full.vision_model.post_layernorm(out.last_hidden_state), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        create_backbone("hf:Dinov2Model", checkpoint=str(tmp_path / "clip"))
