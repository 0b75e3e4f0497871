"""Writing the `table` stage's outputs: table.parquet, table.csv, table.md, paper_tables.md.

Kept apart from tables.py (collecting and rendering) so the renderers import tables.py and this
module imports the renderers: the arrows point one way (no tables <-> paper cycle).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .paper import paper_tables
from .tables import PROBES_KEY, probe_table, to_markdown

# ----------------------------------------------------------------------------- writing

def _version():
    try:
        from importlib.metadata import version
        return version("stitchcache")
    except Exception:
        import stitchcache
        return getattr(stitchcache, "__version__", "unknown")


def write_table(table, probes, out_dir):
    """Write table.parquet, table.csv, table.md and paper_tables.md under out_dir; returns the four paths.

    probes: the base-probe table (``load_probes``) or None to use the one in ``table``'s metadata.
    """
    probes = probe_table(table) if probes is None else probes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta.update({b"stitchcache_version": _version().encode(),
                 b"created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").encode(),
                 PROBES_KEY: json.dumps(probes.to_pylist()).encode()})
    table = table.replace_schema_metadata(meta)
    paths = out / "table.parquet", out / "table.csv", out / "table.md", out / "paper_tables.md"
    pq.write_table(table, paths[0])
    pcsv.write_csv(table, paths[1])
    paths[2].write_text(to_markdown(table, probes) + "\n")
    paths[3].write_text(paper_tables(table, probes) + "\n")
    return paths
