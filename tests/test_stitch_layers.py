"""The stitch-layer families: LoRA (source block l+1 + adapters) and the least-squares Linear init.

LoRA: only adapters (+ width projection) train, every adapter is live, with B = 0 the stitch is exactly
the source block l+1 on every family (rope included), checkpoints hold only the trainable tensors and
reload to the same outputs. Every family (linear, mlp, lora) lowers the FFM loss between two different
libraries (timm ViT with registers <-> transformers Dinov2Model) through the CLI. lstsq recovers an
exact affine map; the linear_lstsq stitch choice starts from the least-squares minimum of the LFM loss
(a better start than the default init), chains into ffm_tlt and reloads.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import extract_records, tiny_vit
from stitchcache import load_stitched
from stitchcache.backends import create_backbone
from stitchcache.cli import main as cli
from stitchcache.stitch.layers import PrefixMap, Stitch
from stitchcache.stitch.lora import LoRAStitch
from stitchcache.stitch.losses import ffm_loss
from stitchcache.stitch.lstsq import lstsq_linear
from stitchcache.stitch.model import StitchedTail, load_checkpoint
from test_backends import HF_CONFIGS, TINY_TIMM, _open_clip_configs

# a tiny transformers Dinov2Model on the same 8x8 grid as tiny_vit() (patch 8 @ 64 px vs patch 4 @ 32 px)
DINO = {"model_type": "dinov2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 2, "image_size": 64, "patch_size": 8}


def _lora_config(bb, layer, d_out=None, tgt_prefix=None, rank=4):
    return {"kind": "lora", "d_in": bb.width, "d_out": d_out or bb.width, "src_prefix": bb.num_prefix_tokens,
            "tgt_prefix": bb.num_prefix_tokens if tgt_prefix is None else tgt_prefix, "layer": layer,
            "source": bb.spec, "rank": rank, "alpha": float(rank)}


def _adapters(stitch):
    return [m for m in stitch.modules() if hasattr(m, "lora_B")]


# ---- LoRA: structure ------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_projection():
    src = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=32)["kwargs"])
    n_src = sum(p.numel() for p in src.parameters())
    stitch = Stitch(_lora_config(src, 1, d_out=48), source=src)
    trainable = {n for n, p in stitch.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n or n.startswith("layer.proj.") for n in trainable)
    assert {"layer.proj.weight", "layer.proj.bias"} <= trainable
    # adapters on attention qkv/proj and mlp fc1/fc2 of block 2 (index 1) only
    adapted = sorted(stitch.layer.adapted)
    assert adapted == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"], adapted
    # only block l+1 is copied (the others are Identity), the source is not modified
    blocks = stitch.layer.src.model.blocks
    assert [type(b).__name__ for b in blocks] == ["Identity", "Block", "Identity"]
    assert sum(p.numel() for p in src.parameters()) == n_src and type(src.model.blocks[1].attn.qkv) is torch.nn.Linear
    tgt = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=48)["kwargs"])
    h, z = torch.randn(2, 65, 32), torch.randn(2, 65, 48)
    for m in _adapters(stitch):  # a non-zero B so that A receives a gradient too
        torch.nn.init.normal_(m.lora_B, std=0.1)
    ffm_loss(StitchedTail(stitch, tgt, 1), h, z).backward()
    for n, p in stitch.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert all(p.grad is None for p in src.parameters()) and all(p.grad is None for p in tgt.parameters())
    # the state dict holds the trainable tensors only
    assert set(stitch.state_dict()) == trainable


def _families():
    return {
        "timm-vit": ("timm:vit_small_patch16_224", TINY_TIMM),
        "timm-dinov3-rope": ("timm:vit_small_patch16_dinov3", TINY_TIMM),
        # q/v biases: Eva attention calls F.linear(x, qkv.weight, bias), bypassing the layer's forward
        "timm-dinov3-qkvb": ("timm:vit_small_patch16_dinov3_qkvb", TINY_TIMM),
        "hf-dinov2": ("hf:Dinov2Model", {"config": HF_CONFIGS["Dinov2Model"]}),
        "hf-dinov3-rope": ("hf:DINOv3ViTModel", {"config": HF_CONFIGS["DINOv3ViTModel"]}),
        "hf-clip": ("hf:CLIPVisionModel", {"config": HF_CONFIGS["CLIPVisionModel"]}),
        "open_clip-mha": ("open_clip:{StitchTinyViT}", {}),
    }


@pytest.fixture(scope="module")
def oc_paths(tmp_path_factory):
    return _open_clip_configs(tmp_path_factory.mktemp("open_clip_cfg"))


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("fid", list(_families()))
def test_zero_lora_is_the_source_block(fid, layer, oc_paths):
    """B = 0: s(S_l(x)) == S_{l+1}(x), so the tail from l+1 gives the model's own output — NOT the tail
    from l (a LoRA self-stitch at l runs block l+1 twice). Every adapter is live: a non-zero B in any
    single one of them changes the output."""
    name, kwargs = _families()[fid]
    bb = create_backbone(name.format(**oc_paths), **kwargs)
    stitch = Stitch(_lora_config(bb, layer), source=bb).eval()
    x = torch.randn(2, 3, *bb.image_size)
    with torch.no_grad():
        hs = bb.forward_layers(x, [layer, layer + 1])
        out = stitch(hs[layer])
        torch.testing.assert_close(out, hs[layer + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(StitchedTail(stitch, bb, layer + 1)(hs[layer]), bb(x), rtol=0, atol=1e-5)
        if fid in ("timm-vit", "hf-dinov2", "hf-clip"):  # (no near-zero LayerScale at random init)
            assert (StitchedTail(stitch, bb, layer)(hs[layer]) - bb(x)).abs().max() > 1e-3  # block l+1 twice
        adapters = _adapters(stitch)
        assert len(adapters) >= 4
        residual = (out - hs[layer]).abs().max()  # what the block adds (tiny under LayerScale 1e-5)
        for m in adapters:
            m.lora_B.normal_(std=0.5)
            assert (stitch(hs[layer]) - out).abs().max() > 1e-2 * residual, f"dead adapter in {fid}"
            m.lora_B.zero_()


def test_lora_prefix_map_comes_after_the_block():
    """Source with 5 prefix tokens (CLS + 4 registers) -> target with 1: the block sees all 5."""
    src = create_backbone("timm:vit_small_patch16_224", **tiny_vit(width=32, reg_tokens=4)["kwargs"])
    assert src.num_prefix_tokens == 5
    stitch = Stitch(_lora_config(src, 1, tgt_prefix=1), source=src).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = src.forward_layers(x, [1, 2])
        out = stitch(hs[1])
    assert out.shape == (2, 65, 32)
    torch.testing.assert_close(out, PrefixMap(5, 1)(hs[2]), rtol=0, atol=1e-5)


# ---- least squares --------------------------------------------------------------------------------
def test_lstsq_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(0)
    n, tokens, d_in, d_out = 40, 6, 12, 7
    hs = torch.randn(n, tokens, d_in, generator=g)
    a, c = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5, torch.randn(d_out, generator=g)
    prefix = PrefixMap(1, 2)  # the source CLS feeds both target prefix slots
    ht = prefix(hs) @ a + c
    # without the ridge the streamed, centred solve is exact (batches of 7 images: 6 batches)
    w, b = lstsq_linear(hs.numpy(), ht.numpy(), prefix, batch_size=7, ridge=0.0)
    torch.testing.assert_close(w, a.t(), rtol=0, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)
    # the default ridge (1e-4 * trace / D) shrinks W by ~1e-4 relative (1.6e-4 at worst here); the bias,
    # fitted centred, is not regularised
    w, b = lstsq_linear(hs.numpy(), ht.numpy(), prefix, batch_size=7)
    torch.testing.assert_close(w, a.t(), rtol=0, atol=3e-4)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-4)
    assert (w - a.t()).abs().max() > 1e-6  # (the ridge is applied)


# ---- through the CLI: two different libraries ---------------------------------------------------------
@pytest.fixture
def stores(tmp_path, image_folder):
    """timm ViT with registers (width 32, 5 prefix tokens) and transformers Dinov2Model (width 48, CLS)."""
    specs = {"t": {"name": "t", **tiny_vit(width=32, reg_tokens=4)},
             "d": {"name": "d", "backbone": "hf:Dinov2Model", "kwargs": {"config": DINO}}}
    return extract_records(specs, image_folder, tmp_path)


def _train(recs, tmp_path, method, stitch, src, tgt, layer=1, settings=None):
    out = tmp_path / f"{method}-{stitch}-{src}{tgt}.pt"
    settings = {"max_epochs": 4, "patience": 4, "lr_grid": [3e-3], "batch_size": 16, "lfm_batch_size": 16,
                "lora_rank": 4, **(settings or {})}
    argv = ["train", "--method", method, "--layer", str(layer), "--stitch", stitch,
            "--src-train", recs[src, "train"], "--src-val", recs[src, "val"],
            "--tgt-train", recs[tgt, "train"], "--tgt-val", recs[tgt, "val"],
            "--settings", json.dumps(settings), "--out", str(out), "--metrics", str(out) + ".json"]
    assert cli(argv) == 0
    return out, json.loads((tmp_path / (out.name + ".json")).read_text())


@pytest.mark.parametrize("method,stitch,src,tgt", [
    ("ffm", "linear", "d", "t"), ("ffm", "mlp", "d", "t"), ("ffm", "lora", "d", "t"), ("ffm", "lora", "t", "d"),
    ("lfm", "mlp", "t", "d"), ("tlt", "mlp", "d", "t"), ("tlt", "mlp", "t", "d"),
])
def test_each_family_and_recipe_reduces_its_loss(stores, tmp_path, method, stitch, src, tgt):
    """Two libraries (timm ViT with registers, transformers Dinov2Model): every recipe learns."""
    _, metrics = _train(stores, tmp_path, method, stitch, src, tgt)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < 0.9 * losses[0], losses


def test_lora_checkpoint_reloads_to_the_same_outputs(stores, tmp_path):
    from stitchcache.cache import iter_batches, open_record
    from stitchcache.train import mean_over

    out, metrics = _train(stores, tmp_path, "ffm", "lora", "t", "d", settings={"max_epochs": 2})
    ckpt = load_checkpoint(out)
    keys = set(ckpt["stitch_state"])
    assert keys and all("lora_A" in k or "lora_B" in k or k.startswith("layer.proj.") for k in keys), keys
    assert ckpt["spec"]["stitch"]["source"] == ckpt["spec"]["source"] and ckpt["spec"]["stitch"]["layer"] == 1
    assert any(v.abs().sum() > 0 for k, v in ckpt["stitch_state"].items() if "lora_B" in k)  # it trained

    model = load_stitched(out)
    # the reloaded stitch reproduces the trainer's best validation loss exactly
    _, sv = open_record(stores["t", "val"])
    _, tv = open_record(stores["d", "val"])
    with torch.no_grad():
        val = mean_over(iter_batches([sv.layer(1), tv.final], 16), lambda b: ffm_loss(model.tail, b[0], b[1]))
    assert val == pytest.approx(ckpt["train"]["val_loss"], rel=1e-5, abs=1e-7)
    # images -> final tokens equals the tail on an independently built source's layer-1 tokens,
    # and differs from a fresh (B = 0) LoRA stitch: the adapters were restored
    src = create_backbone(tiny_vit(width=32, reg_tokens=4)["backbone"], **tiny_vit(width=32, reg_tokens=4)["kwargs"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = src.forward_layers(x, [1])[1]
        z = model(x)
        torch.testing.assert_close(z, model.tail(h))
        fresh = StitchedTail(Stitch(ckpt["spec"]["stitch"]).eval(), model.tail.target, 1)
        assert (fresh(h) - z).abs().max() > 1e-4
    assert z.shape == (2, 65, 48) and isinstance(model.tail.stitch.layer, LoRAStitch)


def test_lstsq_init_starts_the_linear_stitch_better(stores, tmp_path):
    runs = {}
    for choice in ("linear", "linear_lstsq"):
        (tmp_path / choice).mkdir()
        out, metrics = _train(stores, tmp_path / choice, "lfm", choice, "d", "t", settings={"max_epochs": 1})
        runs[choice] = metrics
    assert (runs["linear_lstsq"]["init"], runs["linear_lstsq"]["start"]) == ("lstsq", "lstsq")
    assert (runs["linear"]["init"], runs["linear"]["start"]) == ("default", "default")
    assert runs["linear_lstsq"]["history"][0]["train_loss"] < 0.5 * runs["linear"]["history"][0]["train_loss"]


def _train_tokens(recs, src, tgt, layer=1):
    """All training tokens: source (prefix-mapped by hand: every target prefix slot gets the source CLS,
    as 'd' has only a CLS and 't' has CLS + 4 registers) and target, float64, one row per token."""
    from stitchcache.cache import open_record

    _, s_store = open_record(recs[src, "train"])
    _, t_store = open_record(recs[tgt, "train"])
    hs = torch.as_tensor(s_store.layer(layer)[:].astype("float64"))
    ht = torch.as_tensor(t_store.layer(layer)[:].astype("float64"))
    pt = ht.shape[1] - (hs.shape[1] - 1)  # target prefix tokens (patch grids are equal)
    hs = torch.cat([hs[:, :1].expand(-1, pt, -1), hs[:, 1:]], dim=1)
    return hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), s_store.layer(layer)[:], t_store.layer(layer)[:]


def test_lstsq_init_solves_the_least_squares_problem(stores, tmp_path, monkeypatch):
    """At step 0 (the module the trainer hands to the optimiser) the linear_lstsq stitch's LFM loss on the
    training split equals the closed-form least-squares minimum (an independent torch.linalg.lstsq on all
    training tokens) and is <= the default init's; its gradient there vanishes."""
    import stitchcache.stitch.trainer as trainer

    real_fit, start = trainer.fit, {}

    def spy_fit(build, *args, **kwargs):
        start["module"] = build()  # exactly what fit() trains from
        return real_fit(build, *args, **kwargs)

    monkeypatch.setattr(trainer, "fit", spy_fit)
    x, y, hs_raw, ht_raw = _train_tokens(stores, "d", "t")
    hs_raw, ht_raw = torch.as_tensor(hs_raw.astype("float32")), torch.as_tensor(ht_raw.astype("float32"))
    # the minimum of the problem, without the ridge: [X 1] beta = Y
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    beta = torch.linalg.lstsq(xa, y).solution
    loss_star = float(((xa @ beta - y) ** 2).mean())
    # the documented closed form the init uses (lstsq.py): centred, ridge lam = 1e-4 trace(C_xx) / D_s on W only
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx = xc.t() @ xc
    w_star = torch.linalg.solve(cxx + 1e-4 * torch.trace(cxx) / cxx.shape[0] * torch.eye(cxx.shape[0], dtype=x.dtype),
                                xc.t() @ yc)
    w_star, b_star = w_star.t(), y.mean(0) - x.mean(0) @ w_star

    losses, grads = {}, {}
    for choice in ("linear", "linear_lstsq"):
        (tmp_path / choice).mkdir()
        _train(stores, tmp_path / choice, "lfm", choice, "d", "t", settings={"max_epochs": 1})
        stitch = start.pop("module")["stitch"].double()
        stitch.zero_grad()
        loss = torch.nn.functional.mse_loss(stitch(hs_raw.double()), ht_raw.double())  # the LFM loss, whole split
        loss.backward()
        losses[choice] = loss.item()
        grads[choice] = max(float(p.grad.abs().max()) for p in stitch.parameters())
        if choice == "linear_lstsq":
            proj = stitch.layer.proj
            torch.testing.assert_close(proj.weight.detach(), w_star, rtol=0, atol=1e-4 * float(w_star.abs().max()))
            torch.testing.assert_close(proj.bias.detach(), b_star, rtol=0, atol=1e-4 * float(b_star.abs().max()))

    assert losses["linear_lstsq"] == pytest.approx(loss_star, rel=1e-3)  # the least-squares minimum (ridge 1e-4)
    assert losses["linear_lstsq"] >= loss_star * (1 - 1e-9)              # (nothing linear beats it)
    assert losses["linear_lstsq"] <= losses["linear"]
    assert losses["linear_lstsq"] < 0.5 * losses["linear"]              # and by a wide margin here
    assert grads["linear_lstsq"] < 1e-2 * grads["linear"]              # a stationary point


def test_linear_lstsq_chain_and_reload(stores, tmp_path):
    """ffm -> ffm_tlt with linear_lstsq: ffm starts from the least-squares fit, ffm_tlt from the ffm
    checkpoint (a plain linear ffm checkpoint is refused), load_stitched rebuilds the checkpoint, and
    evaluate + the report turn it into a linear / lstsq results row."""
    from stitchcache.cache import iter_batches, open_record
    from stitchcache.train import mean_over

    ffm, m_ffm = _train(stores, tmp_path, "ffm", "linear_lstsq", "d", "t", settings={"max_epochs": 1})
    assert (m_ffm["stitch"], m_ffm["family"], m_ffm["init"], m_ffm["start"]) == ("linear_lstsq", "linear", "lstsq", "lstsq")
    ckpt = load_checkpoint(ffm)
    assert ckpt["spec"]["stitch"]["kind"] == "linear_lstsq" and ckpt["train"]["init"] == "lstsq"
    model = load_stitched(ffm)
    assert isinstance(model.tail.stitch.layer.proj, torch.nn.Linear)
    _, sv = open_record(stores["d", "val"])
    _, tv = open_record(stores["t", "val"])
    with torch.no_grad():
        val = mean_over(iter_batches([sv.layer(1), tv.final], 16), lambda b: ffm_loss(model.tail, b[0], b[1]))
    assert val == pytest.approx(ckpt["train"]["val_loss"], rel=1e-5, abs=1e-7)

    argv = lambda stitch, init: ["train", "--method", "ffm_tlt", "--layer", "1", "--stitch", stitch,
                                 "--src-train", stores["d", "train"], "--src-val", stores["d", "val"],
                                 "--tgt-train", stores["t", "train"], "--tgt-val", stores["t", "val"],
                                 "--init", str(init), "--settings", json.dumps({"max_epochs": 1, "batch_size": 16}),
                                 "--out", str(tmp_path / f"ffm_tlt-{stitch}.pt"),
                                 "--metrics", str(tmp_path / f"ffm_tlt-{stitch}.json")]
    assert cli(argv("linear_lstsq", ffm)) == 0
    m = json.loads((tmp_path / "ffm_tlt-linear_lstsq.json").read_text())
    assert (m["init"], m["start"]) == ("lstsq", "checkpoint")
    with pytest.raises(SystemExit, match="different stitch layer"):
        cli(argv("linear", ffm))
    # evaluate -> table: the eval.json names the choice, the results row splits it into family + init
    from stitchcache.report import build_table
    ev = tmp_path / "eval.json"
    assert cli(["evaluate", "--checkpoint", str(ffm), "--src-train", stores["d", "train"], "--src-val", stores["d", "val"],
                "--tgt-train", stores["t", "train"], "--tgt-val", stores["t", "val"], "--cache-root", str(tmp_path / "cache"),
                "--settings", json.dumps({"probe": {"max_epochs": 1, "lr_grid": [0.01]}}), "--out", str(ev)]) == 0
    assert json.loads(ev.read_text())["stitch"] == "linear_lstsq"
    row = build_table([ev], []).to_pylist()[0]
    assert (row["stitch"], row["init"], row["method"]) == ("linear", "lstsq", "ffm")
    with pytest.raises(SystemExit, match="linear_init was removed"):
        _train(stores, tmp_path, "lfm", "linear", "d", "t", settings={"linear_init": "lstsq"})


def test_evaluate_can_drop_its_exports(stores, tmp_path):
    """evaluate.keep_exports: false measures the same numbers and leaves no stitched store behind."""
    ckpt, _ = _train(stores, tmp_path, "lfm", "linear", "d", "t", settings={"max_epochs": 1})
    out = {}
    for keep in (True, False):
        ev = tmp_path / f"eval-{keep}.json"
        settings = {"probe": {"max_epochs": 1, "lr_grid": [0.01]}, "keep_exports": keep}
        assert cli(["evaluate", "--checkpoint", str(ckpt), "--src-train", stores["d", "train"],
                    "--src-val", stores["d", "val"], "--tgt-train", stores["t", "train"], "--tgt-val", stores["t", "val"],
                    "--cache-root", str(tmp_path / f"cache-{keep}"), "--settings", json.dumps(settings),
                    "--out", str(ev)]) == 0
        out[keep] = json.loads(ev.read_text())
    kept = [out[True]["exported_train"], out[True]["exported_val"]]
    assert all(Path(p).is_dir() for p in kept)
    assert out[False]["exported_train"] is None and out[False]["exported_val"] is None
    assert not any((tmp_path / "cache-False" / "stitched").iterdir())
    for k in ("probe_acc", "d_l", "d_L"):
        assert out[False][k] == pytest.approx(out[True][k], rel=1e-6, abs=1e-9)
