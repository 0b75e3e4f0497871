"""Report stage: results table (tables.py), paper-shaped tables (paper.py), the paper's findings as
checks (findings.py), figures (plots.py); writing the outputs in outputs.py, CLI glue in cli.py.
Imports point one way: tables <- paper, findings <- outputs <- cli."""
from .findings import check_findings, findings_markdown
from .outputs import write_table
from .paper import paper_tables
from .tables import build_table, load_probes, probe_table, to_markdown

__all__ = ["build_table", "check_findings", "findings_markdown", "load_probes", "paper_tables", "probe_table",
           "to_markdown", "write_table"]
