"""Provenance: what produced a result, so it is never reused when any of it changed.

A *fingerprint* is a JSON-able dict of everything a result depends on:

  {"settings": the stage's settings (the config section plus seed/device),
   "inputs":   {role: the feature store key / record it read, ...},
   "init":     digest of the checkpoint it started from, or None,
   "code":     digest of the source files of the code that computes it,
   "digest":   sha256 over all of the above}

Every result (train.json, checkpoint, eval.json, probe json, and every ``.partial`` a stage resumes
from) records its fingerprint; consumers compare the recorded fingerprint with the one asked for now
and stop, naming what differs (``check``), or discard a stale partial with a log line (``differs``).
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from .digest import sha256_file as file_digest  # noqa: F401  (sha256 of a file, unmemoised)
from .runtime import log


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(*modules: str) -> str:
    """Digest of the source of the named modules (packages: every .py file in them)."""
    h = hashlib.sha256()
    for name in modules:
        mod = importlib.import_module(name)
        path = Path(mod.__file__)
        files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(settings: dict, inputs: dict | None = None, init: str | None = None,
                code: str | None = None) -> dict:
    fp = {"settings": settings, "inputs": inputs or {}, "init": init, "code": code}
    return {**fp, "digest": digest(fp)}


def differences(recorded: dict | None, asked: dict) -> list[str]:
    """The parts (``settings.lr_grid``, ``inputs.src_train``, ``code``, ...) in which two
    fingerprints differ; ``["missing"]`` when nothing was recorded."""
    if not recorded:
        return ["missing"]
    out = []
    for part in ("settings", "inputs", "init", "code"):
        a, b = recorded.get(part), asked.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(part)
    return out


def differs(recorded: dict | None, asked: dict, what: str) -> bool:
    """True (after a log line naming the differences) when ``recorded`` is not ``asked``."""
    diff = differences(recorded, asked)
    if diff:
        log(f"discarding {what}: it was started with different {', '.join(diff[:8])}"
            + ("" if diff != ["missing"] else " (it records no fingerprint)"))
    return bool(diff)


def check(recorded: dict | None, asked: dict, what: str) -> None:
    """Stop (SystemExit) when a result was produced under other settings/inputs/code than asked."""
    diff = differences(recorded, asked)
    if diff:
        detail = []
        for d in diff[:5]:
            part, _, key = d.partition(".")
            if key and recorded:
                detail.append(f"{d}: {(recorded.get(part) or {}).get(key)!r} there, "
                              f"{(asked.get(part) or {}).get(key)!r} asked")
            else:
                detail.append(d)
        raise SystemExit(f"error: {what} was produced under other settings than asked now "
                         f"({'; '.join(detail)}); re-run the stage that produces it "
                         "(snakemake --forcerun <rule>, or delete it)")
