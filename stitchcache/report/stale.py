"""The table refuses results produced under other settings than the experiment asks for now.

Every eval.json records the training fingerprint of its checkpoint (``train_provenance``) and the
probe settings it used; every probe json its own fingerprint (``provenance``). A table built from a
mix of old and new results would look normal and be wrong, so any mismatch stops the table stage
with every offending file named.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..provenance import differences


def stale_results(evals, probes, asked: dict) -> list[str]:
    """'path: what differs' for every result not produced with ``asked`` ({train, probe, probe_job})."""
    bad = []
    for path in evals:
        r = json.loads(Path(path).read_text())
        rec = r.get("train_provenance")
        got = None if rec is None else dict(rec.get("settings") or {})
        want = dict(asked["train"])
        diff = []
        if got is not None and "seeds" in asked:  # one table over several seeds: each its own
            seed = got.pop("seed", None)
            want.pop("seed", None)
            if seed not in asked["seeds"]:
                diff.append(f"seed {seed} is not in seeds {asked['seeds']}")
        diff += differences(None if got is None else {"settings": got}, {"settings": want})
        if "probe" in asked and r.get("probe_settings") != asked["probe"]:
            diff.append("probe settings")
        if diff:
            bad.append(f"{path}: {', '.join(diff[:6])}")
    for path in probes:
        r = json.loads(Path(path).read_text())
        rec = r.get("provenance")
        if "probe_job" in asked:
            diff = differences(None if rec is None else {"settings": rec.get("settings")},
                               {"settings": asked["probe_job"]})
            if diff:
                bad.append(f"{path}: {', '.join(diff[:6])}")
    return bad


def check_results(evals, probes, asked: dict) -> None:
    bad = stale_results(evals, probes, asked)
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise SystemExit(f"error: {len(bad)} result(s) were produced under other settings than the config "
                         f"asks for now (\"missing\": recorded none):\n  {shown}\n"
                         "re-run them (snakemake --forcerun train evaluate probe), or delete them")
