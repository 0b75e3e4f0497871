"""`stitchcache cache ls | du | verify | gc` on a real cache root."""
import json
from pathlib import Path

from conftest import tiny_vit
from stitchcache.cli import main as cli
from stitchcache.extract import extract


def _two_stores(tmp_path, image_folder):
    root = tmp_path / "cache"
    s = {"chunk_size": 16, "num_workers": 0}
    keep = extract({"name": "keepme", **tiny_vit()}, image_folder, "train", root, s)
    drop = extract({"name": "dropme", **tiny_vit(width=48)}, image_folder, "train", root, s)
    wd = tmp_path / "experiment"
    (wd / "results" / "features").mkdir(parents=True)
    (wd / "results" / "features" / "keep.json").write_text(json.dumps(keep))
    return root, wd, keep, drop


def test_ls_du_verify_gc(tmp_path, image_folder, capsys):
    root, wd, keep, drop = _two_stores(tmp_path, image_folder)
    assert cli(["cache", "ls", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "keepme" in out and "dropme" in out and "complete" in out
    assert cli(["cache", "du", "--root", str(root)]) == 0
    assert "2 stores" in capsys.readouterr().out
    assert cli(["cache", "verify", "--root", str(root), "--deep"]) == 0

    # a lost chunk file is detected
    chunk = next((Path(drop["store"]) / "final" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    assert cli(["cache", "verify", "--root", str(root)]) == 1
    assert "chunks absent" in capsys.readouterr().out

    # gc: dry run removes nothing, --yes removes only the unreferenced store
    assert cli(["cache", "gc", "--root", str(root), "--keep-referenced-by", str(wd)]) == 0
    assert "would remove" in capsys.readouterr().out and Path(drop["store"]).exists()
    assert cli(["cache", "gc", "--root", str(root), "--keep-referenced-by", str(wd), "--yes"]) == 0
    assert not Path(drop["store"]).exists() and Path(keep["store"]).exists()
    # ... and the request memos (extract.request_memo_path) of the removed store, not the kept one's
    memos = {json.loads(f.read_text())["store"] for f in (root / "requests").glob("*.json")}
    assert memos == {keep["store"]}
