"""Every input that changes a store's tokens changes both the request key (DAG time) and the store
key (extract time); a changed file never passes the digest memo."""
import json
import os

from conftest import tiny_vit
from stitchcache.cache.keys import content_key
from stitchcache.data import open_split
from stitchcache.extract import model_from_spec, store_key_parts
from stitchcache.inputs import _split_identity, _weights_identity, request_key

SETTINGS = {"layers": "all", "dtype": "float16", "chunk_size": 16, "num_workers": 0}


def keys(spec, dataset, settings=SETTINGS):
    """(request key, store key) of `spec` on dataset/train, computed the way the workflow and the
    extract job compute them."""
    _weights_identity.cache_clear()
    _split_identity.cache_clear()
    req = request_key(spec, dataset, "train", settings)
    bb = model_from_spec(spec)
    store = content_key(store_key_parts(bb, spec, open_split(dataset, "train"), settings))
    return req, store


def assert_both_change(before, after):
    assert before[0] != after[0], "request key did not change"
    assert before[1] != after[1], "store key did not change"


def test_rewritten_file_with_restored_mtime_gets_a_new_digest(tmp_path):
    """The digest memo was keyed by size + mtime: same-size new content with the old mtime passed."""
    from stitchcache.backends.weights import weights_digest

    f = tmp_path / "w.pt"
    f.write_bytes(b"a" * 64)
    st = f.stat()
    d1 = weights_digest(f)
    f.write_bytes(b"b" * 64)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back, as cp -p / rsync -t / tar do
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert weights_digest(f) != d1
    assert weights_digest(f) == weights_digest(f)  # and the memo serves the new digest afterwards


def test_file_replaced_by_another_inode_is_rehashed(tmp_path):
    from stitchcache.digest import file_digest

    f, g = tmp_path / "w.pt", tmp_path / "new.pt"
    f.write_bytes(b"a" * 64)
    d1 = file_digest(f)
    g.write_bytes(b"c" * 64)
    st = f.stat()
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(g, f)  # atomically replaced (a download tool's rename), same size and mtime
    assert file_digest(f) != d1


def _open_clip_json(path, mlp_ratio=4.0):
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16, "mlp_ratio": mlp_ratio}, "text_cfg": text}
    path.write_text(json.dumps(cfg))


def test_editing_open_clip_model_json_changes_both_keys(tmp_path, image_folder):
    """Same depth, width, patch and preprocessing, another MLP width: other tokens."""
    cfg = tmp_path / "TinyClipKeys.json"
    _open_clip_json(cfg, mlp_ratio=4.0)
    spec = {"name": "oc", "backbone": f"open_clip:{cfg}", "kwargs": {}, "checkpoint": None}
    before = keys(spec, image_folder)
    _open_clip_json(cfg, mlp_ratio=2.0)
    assert_both_change(before, keys(spec, image_folder))


def _hf_dir(d):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)
    Dinov2Model(cfg).save_pretrained(d)
    return d


def test_adding_preprocessor_config_next_to_hf_weights_changes_both_keys(tmp_path, image_folder):
    from transformers import BitImageProcessor

    d = _hf_dir(tmp_path / "hf")
    spec = {"name": "hf", "backbone": "hf:Dinov2Model", "kwargs": {}, "checkpoint": str(d)}
    before = keys(spec, image_folder)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(d)
    after = keys(spec, image_folder)
    assert_both_change(before, after)
    # and an edit of it
    p = d / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["image_mean"] = [0.4] * 3
    p.write_text(json.dumps(cfg))
    assert_both_change(after, keys(spec, image_folder))


def test_new_extract_setting_enters_both_keys(image_folder):
    """A token-changing extract setting (e.g. the view policy) is keyed without being listed."""
    spec = {"name": "t", **tiny_vit(), "checkpoint": None}
    before = keys(spec, image_folder)
    assert_both_change(before, keys(spec, image_folder, {**SETTINGS, "view": "native"}))


def test_layout_settings_do_not_change_keys(image_folder):
    spec = {"name": "t", **tiny_vit(), "checkpoint": None}
    before = keys(spec, image_folder)
    after = keys(spec, image_folder, {**SETTINGS, "chunk_size": 8, "batch_size": 3, "num_workers": 2,
                                      "compressor": "zstd", "device": "cpu", "seed": 5, "lock_timeout": 1})
    assert before == after


def test_library_version_enters_both_keys(image_folder, monkeypatch):
    from stitchcache.backends import identity

    spec = {"name": "t", **tiny_vit(), "checkpoint": None}
    before = keys(spec, image_folder)
    real = identity._version.__wrapped__
    monkeypatch.setattr(identity, "_version", lambda p: "0.0.0-other" if p == "torchvision" else real(p))
    assert_both_change(before, keys(spec, image_folder))


def test_timm_pretrained_cfg_overlay_enters_both_keys(image_folder):
    spec = {"name": "t", **tiny_vit(), "checkpoint": None}
    before = keys(spec, image_folder)
    spec2 = {**spec, "kwargs": {**spec["kwargs"], "pretrained_cfg_overlay": {"mean": [0.5] * 3, "std": [0.5] * 3}}}
    assert_both_change(before, keys(spec2, image_folder))


def test_model_names_do_not_change_keys(image_folder):
    spec = {"name": "t", **tiny_vit(), "checkpoint": None}
    assert keys(spec, image_folder) == keys({**spec, "name": "other"}, image_folder)


def test_missing_open_clip_json_is_named(tmp_path):
    from stitchcache.backends.identity import model_inputs

    p = tmp_path / "Nope.json"
    assert model_inputs(f"open_clip:{p}")["files"] == {"model_config": f"missing:{p}"}
