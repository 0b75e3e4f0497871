"""Tree export: one weights_only artefact, load_tree gives a frozen LLaVA-style vision tower."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tree_helpers import backbone, write_stitch
from stitchcache import load_tree
from stitchcache.cli import main as cli
from stitchcache.tree import TreeOptions, tree_from_checkpoints
from stitchcache.tree.export import export_tree


@pytest.fixture
def pil_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40, 36, 3)) * 255).astype("uint8")) for _ in range(3)]


@pytest.mark.parametrize("kind", ["mlp", "lora"])
def test_export_roundtrip_is_exact_and_self_contained(tmp_path, kind):
    cks = [write_stitch(tmp_path / f"a-{t}.pt", "a", t, 1, kind=kind) for t in "bd"]
    opts = TreeOptions(fusion="concat", select_layer=-2)
    tree = tree_from_checkpoints(cks, 1, opts)
    path = tmp_path / "tree.pt"
    export_tree(tree, path)
    art = torch.load(path, weights_only=True)
    assert art["format"] == "stitchcache-tree/1" and art["spec"]["names"] == ["a", "b", "d"]
    for c in cks:
        c.unlink()  # the artefact needs neither the stitch checkpoints nor weight files
    tower = load_tree(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower(x), tree(x))


def test_vision_tower_properties_and_processor(tmp_path, pil_images):
    ck = write_stitch(tmp_path / "a-b.pt", "a", "b", 2)
    path = tmp_path / "t.pt"
    assert cli(["tree", "export", "--checkpoints", str(ck), "--fusion", "concat", "--select-layer", "-1",
                "--select-feature", "patch", "--out", str(path)]) == 0
    tower = load_tree(path)
    a = backbone("a")
    assert tower.hidden_size == 32 + 48 and tower.num_patches == 64 and tower.num_patches_per_side == 8
    assert tower.select_layer == -1 and tower.select_feature == "patch" and tower.dtype == torch.float32
    assert tower.device.type == "cpu" and tower.dummy_feature.shape == (1, 80) and tower.is_loaded
    assert not any(p.requires_grad for p in tower.parameters())  # frozen by default
    px = tower.image_processor.preprocess(pil_images, return_tensors="pt")["pixel_values"]
    ref = torch.stack([a.preprocess.transform()(im) for im in pil_images])
    assert px.shape == (3, 3, 32, 32) and torch.equal(px, ref)  # the trunk's preprocessing
    feats = tower(px)
    assert feats.shape == (3, 64, 80) and not feats.requires_grad
    listed = tower([p for p in px])  # LLaVA also passes a list of images
    assert len(listed) == 3 and torch.allclose(listed[1][0], feats[1], atol=1e-5)
    assert tower(px.double()).dtype == torch.float64  # output in the input dtype


def test_llava_style_projector_trains_through_a_frozen_tower(tmp_path, pil_images):
    """A minimal LLaVA wiring: tower -> 2-layer MLP projector (mlp2x_gelu) into a made-up LLM width."""
    cks = [write_stitch(tmp_path / f"a-{t}.pt", "a", t, 1) for t in "be"]
    path = tmp_path / "t.pt"
    assert cli(["tree", "export", "--checkpoints", *map(str, cks), "--fusion", "concat", "--out", str(path)]) == 0
    tower = load_tree(path)
    llm_width = 72
    projector = nn.Sequential(nn.Linear(tower.hidden_size, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
    images = tower.image_processor.preprocess(pil_images, return_tensors="pt")["pixel_values"]
    before = [p.detach().clone() for p in tower.parameters()]
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-2)
    tokens = projector(tower(images))  # (B, N, llm_width): visual tokens for the LLM
    assert tokens.shape == (3, tower.num_patches, llm_width)
    loss = tokens.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in tower.parameters())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(tower.parameters(), before))
    assert projector(tower(images)).pow(2).mean() < loss  # the projector learned, the tower did not move


def test_interleave_tower_and_bad_artefact(tmp_path):
    ck = write_stitch(tmp_path / "a-d.pt", "a", "d", 1)  # both width 32
    path = tmp_path / "t.pt"
    assert cli(["tree", "export", "--checkpoints", str(ck), "--fusion", "interleave", "--out", str(path)]) == 0
    tower = load_tree(path)
    assert tower.hidden_size == 32 and tower.num_tokens == 128
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 128, 32)
    torch.save({"format": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a stitchcache tree artefact"):
        load_tree(tmp_path / "bad.pt")
