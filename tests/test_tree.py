"""VFM Stitch Tree module: exactness, stitch equivalence, fusion shapes/order, build checks."""
import pytest
import torch

from tree_helpers import backbone, write_stitch
from stitchcache import load_stitched
from stitchcache.tree import StitchTree, TreeError, TreeOptions, fuse, full_tokens, tree_from_checkpoints

FULL_TOKENS = TreeOptions(select_feature="cls_patch")  # select_layer -1 + auto norm: the final tokens z


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("trunk", ["a", "b", "d"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_identity_self_stitch_tree_reproduces_each_model_exactly(tmp_path, trunk, k):
    bb = backbone(trunk)
    x = torch.randn(2, 3, *bb.image_size)
    ck = write_stitch(tmp_path / "self.pt", trunk, trunk, k, identity=True)
    tree = tree_from_checkpoints([ck], k, FULL_TOKENS)
    with torch.no_grad():
        own, self_branch = tree(x)
        ref = bb(x)
    assert tree.names == [trunk, f"{trunk}_self"]
    assert torch.equal(own, ref) and torch.equal(self_branch, ref)


@pytest.mark.parametrize("kind", ["mlp", "linear", "lora"])
def test_branch_equals_load_stitched(tmp_path, pixels, kind):
    cks = [write_stitch(tmp_path / f"a-{t}.pt", "a", t, 1, kind=kind, seed=i) for i, t in enumerate("bcd")]
    tree = tree_from_checkpoints(cks, 1, FULL_TOKENS)
    with torch.no_grad():
        outs = tree(pixels)
        assert torch.equal(outs[0], backbone("a")(pixels))
        for ck, out in zip(cks, outs[1:]):
            torch.testing.assert_close(out, load_stitched(ck)(pixels), rtol=0, atol=1e-6)


def test_trunk_runs_once_and_branches_skip_their_prefix(tmp_path, pixels, monkeypatch):
    cks = [write_stitch(tmp_path / f"a-{t}.pt", "a", t, 2) for t in "bc"]
    tree = tree_from_checkpoints(cks, 2, TreeOptions())
    calls = []
    for n in tree.names:
        bb = tree.model(n)
        monkeypatch.setattr(bb, "embed", lambda x, f=bb.embed, n=n: calls.append((n, 0)) or f(x))
        monkeypatch.setattr(bb, "block", lambda i, h, f=bb.block, n=n: calls.append((n, i)) or f(i, h))
    with torch.no_grad():
        tree(pixels)
    assert calls == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 3), ("c", 3)]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_two_to_five_vfms_concat_order_and_shapes(tmp_path, pixels, n):
    targets = "bcde"[: n - 1]
    cks = [write_stitch(tmp_path / f"a-{t}.pt", "a", t, 1) for t in targets]
    with torch.no_grad():
        parts = tree_from_checkpoints(cks, 1, TreeOptions(fusion="tuple"))(pixels)
        cat = tree_from_checkpoints(cks, 1, TreeOptions(fusion="concat"))(pixels)
    widths = [backbone(m).width for m in "a" + targets]
    assert [p.shape for p in parts] == [torch.Size([3, 64, w]) for w in widths]  # patch tokens only
    assert cat.shape == (3, 64, sum(widths))
    assert torch.equal(cat, torch.cat(parts, -1))  # trunk first, then branches in checkpoint order


def test_interleave_alternates_tokens():
    a, b, c = (torch.full((2, 4, 3), float(v)) + torch.arange(4.0).view(1, 4, 1) * 10 for v in (1, 2, 3))
    out = fuse([a, b, c], "interleave", ["a", "b", "c"])
    assert out.shape == (2, 12, 3)
    assert out[0, :6, 0].tolist() == [1, 2, 3, 11, 12, 13]  # a0 b0 c0 a1 b1 c1


def test_interleave_and_concat_checks(tmp_path, pixels):
    ck = write_stitch(tmp_path / "a-b.pt", "a", "b", 1)
    with pytest.raises(TreeError, match="equal widths"):
        tree_from_checkpoints([ck], 1, TreeOptions(fusion="interleave"))(pixels)
    ck = write_stitch(tmp_path / "a-d.pt", "a", "d", 1)  # d: CLS + 2 registers, a: CLS only
    with pytest.raises(TreeError, match="equal token counts"):
        tree_from_checkpoints([ck], 1, TreeOptions(fusion="concat", select_feature="cls_patch"))(pixels)
    with torch.no_grad():  # equal widths (32) and patch tokens: interleave works
        out = tree_from_checkpoints([ck], 1, TreeOptions(fusion="interleave"))(pixels)
    assert out.shape == (3, 128, 32)


def test_build_checks_source_and_layer(tmp_path):
    ab = write_stitch(tmp_path / "a-b.pt", "a", "b", 1)
    ac2 = write_stitch(tmp_path / "a-c2.pt", "a", "c", 2)
    bc = write_stitch(tmp_path / "b-c.pt", "b", "c", 1)
    with pytest.raises(TreeError, match="stitched at layer 2, but the tree splits at k=1"):
        tree_from_checkpoints([ab, ac2], 1)
    with pytest.raises(TreeError, match="source is 'b', not the trunk 'a'"):
        tree_from_checkpoints([ab, bc], 1)
    with pytest.raises(TreeError, match="second branch"):
        tree_from_checkpoints([ab, ab], 1)
    with pytest.raises(TreeError, match="lies inside the shared trunk"):
        tree_from_checkpoints([ab], 1, TreeOptions(select_layer=0))


def test_select_layer_and_final_norm(tmp_path, pixels):
    """-2 = layer L-1 of each branch; auto norm = pre-norm there (LLaVA's hidden_states[-2])."""
    ck = write_stitch(tmp_path / "a-d.pt", "a", "d", 1)
    a, d = backbone("a"), backbone("d")
    with torch.no_grad():
        pre = tree_from_checkpoints([ck], 1, TreeOptions(select_layer=-2, select_feature="cls_patch"))
        normed = tree_from_checkpoints([ck], 1, TreeOptions(select_layer=-2, final_norm="always"))
        assert pre.layers == {"a": 2, "d": 3}
        t_pre, d_pre = pre(pixels)
        t_norm, _ = normed(pixels)
        h = a.forward_layers(pixels, [2])[2]
        assert torch.equal(t_pre, h) and torch.equal(t_norm, a.final_norm(h)[:, 1:])
        stitched = pre.stitches["d"](a.forward_layers(pixels, [1])[1])
        assert torch.equal(d_pre, d.block(3, d.block(2, stitched)))
        never = tree_from_checkpoints([ck], 1, TreeOptions(final_norm="never", select_feature="cls_patch"))
        assert torch.equal(never(pixels)[0], a.forward_layers(pixels, [3])[3])


def test_full_tokens_runs_each_model_on_its_own_input():
    models = {n: backbone(n) for n in "ab"}
    px = {n: torch.randn(2, 3, *m.image_size) for n, m in models.items()}
    with torch.no_grad():
        out = full_tokens(models, px, TreeOptions())
        assert all(torch.equal(o, m(px[n])[:, 1:]) for o, (n, m) in zip(out, models.items()))


def test_needs_a_branch():
    with pytest.raises(TreeError, match="at least one branch"):
        StitchTree(backbone("a"), 1, {})
