"""Report stage: results table (tables.py), paper-shaped tables (paper.py) and figures (plots.py);
CLI glue in cli.py."""
from .paper import paper_tables
from .tables import build_table, load_probes, probe_table, to_markdown, write_table

__all__ = ["build_table", "load_probes", "paper_tables", "probe_table", "to_markdown", "write_table"]
