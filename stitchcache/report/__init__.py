"""Report stage: results table (tables.py) and figures (plots.py); CLI glue in cli.py."""
from .tables import build_table, load_probes, probe_table, to_markdown, write_table

__all__ = ["build_table", "load_probes", "probe_table", "to_markdown", "write_table"]
