"""The paper's three findings as checkable claims over a results table (``results/findings.md``).

``check_findings(table, probes=None) -> list[Finding]`` and ``findings_markdown(...) -> str``.
Every claim is checked per (dataset, ordered cross pair S → T, stitch variant) on seed means; the
numbers it used are printed with their seed spread (mean ± sample std, n seeds). Accuracies are the
*task* accuracies of the paper's tables: the trained head (``head_acc``) for TLT / FFM→TLT, the
refitted linear probe (``probe_acc``) for the label-free LFM / FFM and for the base models.

Stitch points: the layers present for the dataset, sorted; *shallow* = the first third of them
(at least one), *deep* = the last third (at least one); with a single layer there is no shallow /
deep contrast and the claims that need one have not enough data.

- Finding 1 (how the stitch is trained matters): (a) d_l(LFM) <= d_l(FFM) at every point;
  (b) d_L(FFM) <= d_L(LFM) at every point; (c) at every shallow point LFM is below FFM (probe) and
  TLT below FFM→TLT (head).
- Finding 2 (FFM init helps TLT): (a) FFM→TLT >= TLT at every point; (b) the gain FFM→TLT − TLT,
  averaged over the shallow points, is >= its average over the deep points.
- Finding 3 (deep stitches beat their parts): at every deep point the FFM→TLT stitched model S → T
  is >= both self-stitch controls S → S and T → T (same layer, stitch variant, method) and >= both
  base linear probes.

Verdicts of one comparison a <= b: *holds* / *does not hold* by the sign of the seed-mean
difference, except that a difference no larger than its noise is *not resolved* (its direction is
noise: on two machines the same code once gave +0.2 and once −0.2 for one such comparison). The
noise is sqrt(s² + se²): s the larger seed std of the cells compared (how much training moves the
number on these test images), se the paired standard error of the accuracy difference over the test
images (how much it would move on another test split of the same size; noise.py, from the per-image
predictions when they are given; distances have only s). With one seed and no predictions there is
no noise estimate and every comparison counts its sign. A claim does not hold when any comparison
fails, holds when every one holds, has *not enough data* when a value it needs is missing, else is
not resolved; a finding combines its claims over every block the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .noise import HEAD_METHODS, Correctness
from .tables import fmt_acc, fmt_dist, pair_label, probe_table, rows_of, still_falling, variant

HOLDS, FAILS, NO_DATA = "holds", "does not hold", "not enough data"
UNRESOLVED = "not resolved (within the noise)"
TLT_METHODS = HEAD_METHODS  # scored by the trained head
NAMES = {"lfm": "LFM", "ffm": "FFM", "tlt": "TLT", "ffm_tlt": "FFM→TLT"}
TITLES = {
    1: "Stitch-layer training matters: LFM has the lower d_l, FFM the lower d_L, and LFM / TLT are "
       "weaker at shallow stitch points",
    2: "FFM initialisation helps task-loss training: FFM→TLT >= TLT, most at shallow stitch points",
    3: "At deep stitch points the stitched model beats both self-stitch controls and both base linear probes",
}


@dataclass
class Stat:
    """Seed statistics of one cell: mean, sample std (None for one seed), number of seeds; ``key``:
    the cell's key in the per-image predictions (noise.py; None for a distance)."""
    mean: float | None
    std: float | None
    n: int
    key: tuple | None = None
    falling: int = 0  # seeds whose training was still lowering this value (its own loss) when it ended

    @classmethod
    def of(cls, vals, key=None, falling=0):
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if not vals:
            return cls(None, None, 0, key)
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return cls(m, sd, len(vals), key, falling)

    def fmt(self, kind="acc"):
        f = fmt_acc if kind == "acc" else fmt_dist
        if self.mean is None:
            return "missing"
        spread = f" ± {f(self.std)}" if self.std is not None else ""
        return f"{f(self.mean)}{spread} (n={self.n})"


@dataclass
class Check:
    """One claim in one block (dataset, pair, stitch variant): its verdict and the numbers used."""
    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)


@dataclass
class Finding:
    number: int
    title: str
    verdict: str
    checks: list[Check] = field(default_factory=list)


def task_value(r):
    """The task accuracy of one row: the head for TLT variants (None when absent), else the probe."""
    return r["head_acc"] if r["method"] in TLT_METHODS else r["probe_acc"]


def shallow_deep(layers):
    layers = sorted(set(layers))
    if len(layers) < 2:
        return [], []
    k = max(1, len(layers) // 3)
    return layers[:k], layers[-k:]


WITHIN = "within the noise"
COULD_CHANGE = "could change with longer training"
OWN_LOSS = {"lfm": "d_l", "ffm": "d_L"}  # the distance each matching recipe trains on (its validation loss)


@dataclass
class Noise:
    """What a difference of cell means is compared with: the larger seed std of the cells and the
    test split's standard error of the difference (each None when unknown)."""
    seed_std: float | None
    test_se: float | None

    @property
    def total(self) -> float | None:
        parts = [v for v in (self.seed_std, self.test_se) if v is not None]
        return math.sqrt(sum(v * v for v in parts)) if parts else None

    def unresolved(self, diff: float) -> bool:
        """True when the difference is no larger than the noise: its direction is not resolved."""
        return self.total is not None and abs(diff) <= self.total

    def fmt(self, scale=100.0, digits=1) -> str:
        parts = [f"seed std {scale * self.seed_std:.{digits}f}" if self.seed_std is not None else None,
                 f"test s.e. {scale * self.test_se:.{digits}f}" if self.test_se is not None else None]
        return f"noise {scale * self.total:.{digits}f}: " + ", ".join(p for p in parts if p)


def seed_noise(*stats: Stat) -> float | None:
    """The larger seed std of the cells compared (None when none has one: a single seed)."""
    stds = [s.std for s in stats if s.std is not None]
    return max(stds) if stds else None


def _verdict(ok: bool, noisy: bool) -> str:
    return UNRESOLVED if noisy else HOLDS if ok else FAILS


def _combine(verdicts):
    verdicts = list(verdicts)
    if any(v == FAILS for v in verdicts):
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if not verdicts or any(v == NO_DATA for v in verdicts):
        return NO_DATA
    return UNRESOLVED


class _Block:
    """The rows of one (dataset, S, T, stitch variant) plus the dataset's base probes."""

    def __init__(self, rows, ds, src, tgt, st, probes, correct: Correctness):
        self.ds, self.src, self.tgt, self.st = ds, src, tgt, st
        self.correct = correct
        self.rows = [r for r in rows if r["dataset"] == ds and r["stitch"] == st]
        self.probes = probes
        self.layers = sorted({r["layer"] for r in rows if r["dataset"] == ds})
        self.shallow, self.deep = shallow_deep(self.layers)

    def stat(self, method, layer, fld="task", src=None, tgt=None):
        src, tgt = src or self.src, tgt or self.tgt
        rows = [r for r in self.rows
                if r["source"] == src and r["target"] == tgt and r["method"] == method and r["layer"] == layer]
        vals = [task_value(r) if fld == "task" else r[fld] for r in rows]
        key = ("stitch", self.ds, src, tgt, layer, self.st, method) if fld == "task" else None
        falling = sum(still_falling(r) for r in rows) if OWN_LOSS.get(method) == fld else 0
        return Stat.of(vals, key, falling)

    def probe(self, model) -> Stat:
        return Stat.of([self.probes.get((self.ds, model))], ("probe", self.ds, model))

    def noise(self, terms, stats) -> Noise:
        """The noise of Σ w · mean over ``terms`` = [(w, Stat), ...]; ``stats``: the cells behind it."""
        keys = [(w, s.key) for w, s in terms]
        se = None if any(k is None for _, k in keys) else self.correct.contrast_se(keys)
        return Noise(seed_noise(*stats), se)

    def compare(self, layers, lo, hi, what, kind="acc"):
        """Check lo <= hi at every layer; lo / hi: (label, callable layer -> Stat)."""
        if not layers:
            return NO_DATA, [f"no {what} stitch points to compare"]
        verdicts, ev = [], []
        for l in layers:
            a, b = lo[1](l), hi[1](l)
            if a.mean is None or b.mean is None:
                verdicts.append(NO_DATA)
                ev.append(f"layer {l}: {lo[0]} {a.fmt(kind)}, {hi[0]} {b.fmt(kind)}")
                continue
            nz = self.noise([(1.0, a), (-1.0, b)], (a, b))
            ok, noisy = a.mean <= b.mean, nz.unresolved(a.mean - b.mean)
            verdicts.append(_verdict(ok, noisy))
            scale, digits = (100.0, 1) if kind == "acc" else (1.0, 4)
            detail = nz.fmt(scale, digits) if nz.total is not None else ""
            ev.append(f"layer {l}: {lo[0]} {a.fmt(kind)} {'<=' if ok else '>'} {hi[0]} {b.fmt(kind)}"
                      + (f" ({WITHIN}; {detail})" if noisy else f" ({detail})" if nz.test_se is not None else "")
                      + falling_note(lo[0], a, hi[0], b, ok))
        return _combine(verdicts), ev


def falling_note(lo_name, a: Stat, hi_name, b: Stat, ok: bool) -> str:
    """For a distance a <= b: which side was still falling when its training ended (an upper bound)
    and whether longer training could change the comparison (a falling b when it holds, a falling a
    when it fails) or only widen it."""
    notes = []
    for name, st, lower_side in ((lo_name, a, True), (hi_name, b, False)):
        if st.falling:
            could = (not ok) if lower_side else ok
            notes.append(f"{name} still falling when stopped in {st.falling}/{st.n} seeds: an upper bound, "
                         + (f"*{COULD_CHANGE}*" if could else "longer training would only widen the gap"))
    return f" [{'; '.join(notes)}]" if notes else ""


def _finding1(b: _Block):
    m = lambda method, fld="task": (NAMES[method], lambda l: b.stat(method, l, fld))
    checks = []
    v, ev = b.compare(b.layers, m("lfm", "d_l"), m("ffm", "d_l"), "", "dist")
    checks.append(Check("d_l(LFM) <= d_l(FFM) at every stitch point", v, ev))
    v, ev = b.compare(b.layers, m("ffm", "d_L"), m("lfm", "d_L"), "", "dist")
    checks.append(Check("d_L(FFM) <= d_L(LFM) at every stitch point", v, ev))
    v1, ev1 = b.compare(b.shallow, m("lfm"), m("ffm"), "shallow")
    v2, ev2 = b.compare(b.shallow, m("tlt"), m("ffm_tlt"), "shallow")
    checks.append(Check(f"at shallow points {b.shallow or '(none)'}: LFM <= FFM (probe) and TLT <= FFM→TLT (head)",
                        _combine([v1, v2]), ev1 + ev2))
    return checks


def _gain(b: _Block, layers):
    """Mean over ``layers`` of the seed-mean gain FFM→TLT − TLT and its terms [(w, Stat), ...]
    (None, [] when any is missing)."""
    gains, terms = [], []
    for l in layers:
        a, t = b.stat("ffm_tlt", l), b.stat("tlt", l)
        if a.mean is None or t.mean is None:
            return None, []
        gains.append(a.mean - t.mean)
        terms += [(1.0 / len(layers), a), (-1.0 / len(layers), t)]
    return (sum(gains) / len(gains) if gains else None), terms


def points(v: float) -> str:
    """A signed difference in points, one decimal; a value that rounds to zero prints as +0.0, not -0.0."""
    r = round(100 * v, 1)
    return f"{r if r != 0 else 0.0:+.1f}"


def _finding2(b: _Block):
    m = lambda method: (NAMES[method], lambda l: b.stat(method, l))
    v, ev = b.compare(b.layers, m("tlt"), m("ffm_tlt"), "")
    checks = [Check("FFM→TLT >= TLT (head) at every stitch point", v, ev)]
    (gs, cs), (gd, cd) = _gain(b, b.shallow), _gain(b, b.deep)
    if gs is None or gd is None:
        checks.append(Check("the gain FFM→TLT − TLT is largest at shallow points", NO_DATA,
                            [f"shallow {b.shallow or '(none)'}, deep {b.deep or '(none)'}: a TLT or FFM→TLT value is missing"]))
    else:
        nz = b.noise(cs + [(-w, s) for w, s in cd], [s for _, s in cs + cd])
        ok, noisy = gs >= gd, nz.unresolved(gs - gd)
        spread = (f" ({WITHIN}; {nz.fmt()})" if noisy else f" ({nz.fmt()})" if nz.test_se is not None else "")
        checks.append(Check("the gain FFM→TLT − TLT is largest at shallow points", _verdict(ok, noisy),
                            [f"mean gain at shallow {b.shallow}: {points(gs)} points {'>=' if ok else '<'} "
                             f"at deep {b.deep}: {points(gd)} points{spread}"]))
    return checks


def _finding3(b: _Block):
    stitched = ("S → T " + NAMES["ffm_tlt"], lambda l: b.stat("ffm_tlt", l))
    refs = [(f"S → S ({b.src} → {b.src})", lambda l: b.stat("ffm_tlt", l, src=b.src, tgt=b.src)),
            (f"T → T ({b.tgt} → {b.tgt})", lambda l: b.stat("ffm_tlt", l, src=b.tgt, tgt=b.tgt))]
    for model, side in ((b.src, "source"), (b.tgt, "target")):
        refs.append((f"{side} probe ({model})", lambda l, model=model: b.probe(model)))
    verdicts, ev = [], []
    for ref in refs:
        v, e = b.compare(b.deep, ref, stitched, "deep")
        verdicts.append(v)
        ev += e
    return [Check(f"at deep points {b.deep or '(none)'}: FFM→TLT stitched >= S → S, T → T controls and both "
                  "base probes", _combine(verdicts), ev)]


def check_agrees(rows, pacc, correct: Correctness, tol=1e-5) -> None:
    """Stop when a predictions file does not fit the results table (another run, stale, or another
    split): its accuracy must equal the table's value of the same cell and seed."""
    table = {(("stitch", r["dataset"], r["source"], r["target"], r["layer"], r["stitch"], r["method"]), r["seed"]):
             task_value(r) for r in rows}
    for key, seed, acc, path in correct.accuracies():
        want = pacc.get(key[1:]) if key[0] == "probe" else table.get((key, seed), "absent")
        if want == "absent":
            raise ValueError(f"{path}: predictions of {'/'.join(map(str, key[1:]))} seed {seed}, a run the results "
                             "table does not have (a stale or foreign predictions file)")
        if want is not None and acc is not None and abs(acc - want) > tol:
            raise ValueError(f"{path}: its predictions score {100 * acc:.2f} % but the results table has "
                             f"{100 * want:.2f} % for {'/'.join(map(str, key[1:]))} seed {seed}: the predictions "
                             "do not fit the table (stale, or from another run)")


def check_findings(table, probes=None, correct: Correctness | None = None) -> list[Finding]:
    """``correct``: the per-image predictions (noise.py); without them the test split's noise is not counted."""
    correct = correct if correct is not None else Correctness()
    rows = rows_of(table)
    for r in rows:
        r["stitch"] = variant(r)
    probes = probe_table(table) if probes is None else probes
    pacc = {(p["dataset"], p["model"]): p["probe_acc"] for p in probes.to_pylist()}
    for r in rows:   # the joined columns stand in for a probe table that lacks them
        pacc.setdefault((r["dataset"], r["source"]), r.get("src_probe_acc"))
        pacc.setdefault((r["dataset"], r["target"]), r.get("tgt_probe_acc"))
    check_agrees(rows, pacc, correct)
    blocks = sorted({(r["dataset"], r["source"], r["target"], r["stitch"]) for r in rows if r["kind"] == "cross"})
    out = []
    for number, fn in ((1, _finding1), (2, _finding2), (3, _finding3)):
        checks = []
        for ds, src, tgt, st in blocks:
            b = _Block(rows, ds, src, tgt, st, pacc, correct)
            for c in fn(b):
                c.claim = f"{ds}, {pair_label({'source': src, 'target': tgt, 'kind': 'cross'})}, {st}: {c.claim}"
                checks.append(c)
        out.append(Finding(number, TITLES[number], _combine(c.verdict for c in checks), checks))
    return out


def reported_splits(table) -> list[str]:
    if "split" not in table.column_names:
        return []
    return sorted({s for s in table.column("split").to_pylist() if s})


def findings_markdown(table, probes=None, correct: Correctness | None = None) -> str:
    found = check_findings(table, probes, correct)
    seeds = sorted({s for s in table.column("seed").to_pylist() if s is not None}) if table.num_rows else []
    splits = reported_splits(table)
    one_seed = len(seeds) <= 1
    n_pred = len(correct) if correct is not None else 0
    where = (f"split {' / '.join(splits)}" if splits else "the split the evaluations report")
    if splits == ["val"]:
        where += " (reported on val, also used for selection: no test split)"
    test_noise = (f"the paired standard error of the accuracy difference over the test images (test s.e., from "
                  f"the per-image predictions of {n_pred} runs and probes)" if n_pred else
                  "no per-image predictions were given, so the test split's noise is not counted")
    out = ["# Findings", "",
           f"The paper's three findings, checked on the results in results/table.parquet ({where}; "
           f"seeds {seeds or 'none'}). Comparisons use seed means; numbers are % (accuracy) or MSE per "
           "element (d_l, d_L) as mean ± sample std (n seeds). Accuracy = task accuracy: the trained "
           "head for TLT / FFM→TLT, the refitted linear probe for LFM / FFM and the base models. "
           "Shallow = first third of the stitch points, deep = last third. A comparison marked "
           f"*({WITHIN})* differs by no more than its noise, sqrt(s² + se²): s the larger seed std of "
           f"the cells compared, se {test_noise}. Its direction is noise, so it is *{UNRESOLVED}* — it "
           "neither holds nor fails, and a claim with one such comparison and no failure is not resolved "
           "(more `seeds` shrink s, a larger test split shrinks se). "
           + ("With one seed there is no seed spread" + ("" if n_pred else ": every comparison counts its sign")
              + ". " if one_seed else "")
           + "See docs/stages/report.md.", ""]
    falling = [r for r in rows_of(table) if still_falling(r)]
    if falling:
        out += [f"{len(falling)} of {table.num_rows} stitch trainings were still lowering their validation loss "
                "when early stopping (or `max_epochs`) ended them (results/table.md, *Training*); a distance "
                "that is such a run's own loss (LFM: d_l, FFM: d_L) is an upper bound, and a comparison that "
                f"longer training could turn is marked *{COULD_CHANGE}* (a smaller `train.min_delta` or a larger "
                "`patience` trains longer).", ""]
    if correct is not None and correct.missing:
        names = ", ".join("/".join(str(x) for x in k[1:]) for k in sorted(correct.missing, key=str)[:8])
        out += [f"**Warning: {len(correct.missing)} compared cell(s) have no per-image predictions**, so their "
                f"comparisons count the seed spread only: {names}{' …' if len(correct.missing) > 8 else ''}.", ""]
    for f in found:
        out += [f"## Finding {f.number}: {f.verdict}", "", f"*{f.title}.*", ""]
        if not f.checks:
            out += ["- not enough data: no cross-stitch results", ""]
        for c in f.checks:
            out.append(f"- **{c.verdict}** — {c.claim}")
            out += [f"  - {e}" for e in c.evidence]
        out.append("")
    return "\n".join(out)
