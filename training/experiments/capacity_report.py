"""The capacity experiment's report: gates first, then the success criteria,
tables of mean and 95% interval per arm and cell, plots, and the raw JSON
beside the markdown. The reading is left to a person.

    python -m training.experiments.statex_capacity report --results RESULTS --out docs/experiments/statex_capacity.md
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# two-sided 95% Student t quantiles by degrees of freedom (1..10); normal beyond
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
ORDER = ("base", "statex0", "lpt", "statex", "statex_alt", "scratch")
NAMES = {"base": "base", "statex0": "StateX@0", "lpt": "LPT", "statex": "StateX", "statex_alt": "StateX (alt init)",
         "scratch": "scratch (upper bound)"}
GATE_BASE = 0.8
GATE_SCRATCH_MARGIN = 0.10
WIN_MARGIN = 0.05
BPB_TOLERANCE = 0.03
PASSKEY_TOLERANCE = 0.02


def load(results: Path) -> dict:
    if results.is_dir():
        from training.experiments.statex_capacity import collect

        return collect(results)
    return json.loads(results.read_text())


def gpu_note(meta: dict) -> str:
    """How the pipelines were spread, when over more than one GPU (``run --gpus``)."""
    gpus = sorted({g for g in meta.get("gpus", {}).values() if g is not None})
    return f" x {len(gpus)} (the pipelines round-robin over them)" if len(gpus) > 1 else ""


def interval(values: list[float], ses: list[float | None]) -> tuple[float, float]:
    """Mean and 95% half-width: over seeds (Student t) when there are several,
    else from the one run's standard error over rows."""
    n = len(values)
    mean = sum(values) / n
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    se = ses[0]
    return mean, (1.96 * se if se is not None else float("nan"))


def by_family(data: dict) -> dict:
    """family -> arm -> seed -> arm record."""
    out: dict = {}
    for a in data["arms"]:
        out.setdefault(a["family"], {}).setdefault(a["arm"], {})[a["seed"]] = a
    return out


def cell_names(rec: dict, group: str, task: str | None = None) -> list[str]:
    cells = [(k, v) for k, v in rec["eval"].items() if isinstance(v, dict) and v.get("group") == group
             and (task is None or v["task"] == task)]
    return [k for k, _ in sorted(cells, key=lambda kv: (kv[1]["task"], kv[1]["length"], kv[1]["pairs"] or 0))]


def acc(rec: dict, cell: str) -> float:
    return rec["eval"][cell]["accuracy"]


def _seeds_mean(arm: dict, cell: str, key: str = "accuracy") -> float | None:
    vals = [r["eval"][cell][key] for r in arm.values() if cell in r["eval"]]
    return sum(vals) / len(vals) if vals else None


def success(sx: dict, lpt: dict, cells: list[str], pk_cells: list[str]) -> dict:
    """The success criteria for one expanded arm (seed -> record) against LPT."""
    seeds = sorted(set(lpt) & set(sx))
    diffs = {s: sum(acc(sx[s], c) - acc(lpt[s], c) for c in cells) / len(cells) for s in seeds}
    bpb = {s: sx[s]["eval"]["bpb"]["bits_per_byte"] - lpt[s]["eval"]["bpb"]["bits_per_byte"] for s in seeds}
    pk = {s: sum(acc(sx[s], c) - acc(lpt[s], c) for c in pk_cells) / max(1, len(pk_cells)) for s in seeds}
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    ok = {"every_seed": bool(seeds) and all(d > 0 for d in diffs.values()),
          "margin": bool(seeds) and mean(diffs) >= WIN_MARGIN,
          "bpb": bool(seeds) and mean(bpb) <= BPB_TOLERANCE,
          "passkey": bool(seeds) and mean(pk) >= -PASSKEY_TOLERANCE}
    return {"seeds": seeds, "statex_minus_lpt_per_seed": diffs, "mean": mean(diffs),
            "bpb_diff_per_seed": bpb, "bpb_diff_mean": mean(bpb), "passkey_diff_per_seed": pk,
            "passkey_diff_mean": mean(pk), "criteria": ok, "met": all(ok.values())}


def verdicts(fam: dict) -> dict:
    """The pre-declared gates and success criteria for one family."""
    out: dict = {"gates": {}, "success": {}}
    base, lpt, sx, scratch = (fam.get(k, {}) for k in ("base", "lpt", "statex", "scratch"))
    any_rec = next(iter(next(iter(fam.values())).values()))
    gate_cell = cell_names(any_rec, "gate")[0]
    cap_cells = cell_names(any_rec, "capacity")
    len_cells = cell_names(any_rec, "length")
    pk_cells = cell_names(any_rec, "length", "passkey")
    cap64 = next((c for c in cap_cells if any_rec["eval"][c]["pairs"] == 64), cap_cells[len(cap_cells) // 2])
    b = [acc(r, gate_cell) for r in base.values()]
    out["gates"]["base_recalls"] = {"cell": gate_cell, "per_seed": b, "mean": sum(b) / len(b) if b else None,
                                    "pass": bool(b) and sum(b) / len(b) >= GATE_BASE, "threshold": GATE_BASE}
    lpt64 = _seeds_mean(lpt, cap64)
    s64 = _seeds_mean(scratch, cap64)
    out["gates"]["scratch_beats_lpt"] = {"cell": cap64, "scratch": s64, "lpt_mean": lpt64,
                                         "margin": None if s64 is None or lpt64 is None else s64 - lpt64,
                                         "pass": s64 is not None and lpt64 is not None
                                         and s64 - lpt64 >= GATE_SCRATCH_MARGIN, "threshold": GATE_SCRATCH_MARGIN}
    out["success"] = success(sx, lpt, cap_cells + len_cells, pk_cells)
    if fam.get("statex_alt"):   # the alternative expansion, judged by the same criteria (the verdict is StateX's)
        out["success_alt"] = success(fam["statex_alt"], lpt, cap_cells + len_cells, pk_cells)
    gates_ok = all(g["pass"] for g in out["gates"].values())
    out["verdict"] = ("inconclusive: a gate failed" if not gates_ok else
                      "success criteria met" if out["success"]["met"] else "success criteria not met")
    return out


def arm_name(meta: dict, family: str, arm: str) -> str:
    """StateX arms named by their expansion (from the preset), e.g. "StateX (preserve, dt inherit)"."""
    if arm not in ("statex", "statex_alt"):
        return NAMES[arm]
    p, pre = meta["preset"], "alt_" if arm == "statex_alt" else ""
    init = p.get(f"{pre}{family}_init")
    if init is None:
        return NAMES[arm]
    dt = p.get(f"{pre}mamba2_dt_init") if family == "mamba2" else None
    return f"StateX ({init}{f', dt {dt}' if dt else ''})"


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.4f}"


def table(fam: dict, names: dict = NAMES) -> list[str]:
    """A family's table: mean ± 95% interval per cell and arm, bits per byte, and how the intervals were made."""
    arms = [a for a in ORDER if a in fam]
    any_rec = next(iter(fam[arms[0]].values()))
    cells = (cell_names(any_rec, "gate") + cell_names(any_rec, "capacity") + cell_names(any_rec, "length", "mqar")
             + cell_names(any_rec, "length", "passkey"))
    lines = ["| cell | " + " | ".join(f"{names[a]} (n={len(fam[a])})" for a in arms) + " |",
             "|---|" + "---:|" * len(arms)]
    for c in cells:
        row = []
        for a in arms:
            recs = [r for r in fam[a].values() if c in r["eval"]]
            if not recs:
                row.append("n/a")
                continue
            m, h = interval([r["eval"][c]["accuracy"] for r in recs], [r["eval"][c]["se"] for r in recs])
            row.append(f"{_fmt(m)} ± {_fmt(h)}")
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    row = []
    for a in arms:
        recs = [r for r in fam[a].values() if "bpb" in r["eval"]]
        if recs:
            m, h = interval([r["eval"]["bpb"]["bits_per_byte"] for r in recs], [None])
            row.append(f"{m:.4f}" + (f" ± {h:.4f}" if len(recs) > 1 else ""))
        else:
            row.append("n/a")
    lines.append("| held-out bits per byte | " + " | ".join(row) + " |")
    se_max = max((v["se"] for a in arms for r in fam[a].values() for v in r["eval"].values()
                  if isinstance(v, dict) and v.get("se") is not None and v["task"] == "mqar"), default=None)
    pk_se_max = max((v["se"] for a in arms for r in fam[a].values() for v in r["eval"].values()
                     if isinstance(v, dict) and v.get("se") is not None and v["task"] == "passkey"), default=None)
    lines += ["", f"Accuracy in %, mean over seeds ± 95% interval (Student t over seeds; for one seed, 1.96 x the "
                  f"standard error over rows). Largest within-run standard error of one cell: MQAR "
                  f"{_fmt(se_max)} points, passkey {_fmt(pk_se_max)} points."]
    return lines


def training_lines(fam: dict, names: dict = NAMES) -> list[str]:
    lines = ["| arm | seeds | phases: steps x (batch x seq) | final loss (text / recall) | train s |",
             "|---|---|---|---|---:|"]
    for a in ORDER:
        if a not in fam or a == "statex0":     # no training of its own
            continue
        recs = list(fam[a].values())
        tr = recs[0].get("train", [])
        phases = ", ".join(f"{t['steps']}/{t['planned_steps']} x ({t['batch']} x {t['seq']})" for t in tr)
        last = [r["train"][-1]["curve"][-1] for r in recs if r.get("train") and r["train"][-1]["curve"]]
        loss = (f"{sum(x['text'] for x in last) / len(last):.3f} / {sum(x['recall'] for x in last) / len(last):.3f}"
                if last else "n/a")
        secs = sum(sum(t["seconds"] for t in r.get("train", [])) for r in recs) / len(recs)
        lines.append(f"| {names[a]} | {','.join(str(s) for s in sorted(fam[a]))} | {phases} | {loss} | {secs:.0f} |")
    return lines


def plot(fam_name: str, fam: dict, path: Path, names: dict = NAMES) -> None:
    """A family's three panels (MQAR vs pairs, MQAR vs length, passkey vs length), a line per arm, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ORDER if a in fam]
    any_rec = next(iter(fam[arms[0]].values()))
    panels = [("capacity", None, "pairs", "MQAR at length {L}: accuracy vs pairs"),
              ("length", "mqar", "length", "MQAR ({P} pairs): accuracy vs length"),
              ("length", "passkey", "length", "passkey: accuracy vs length")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (group, task, xkey, title) in zip(axes, panels):
        cells = cell_names(any_rec, group, task)
        xs = [any_rec["eval"][c][xkey] for c in cells]
        for a in arms:
            ms, hs = [], []
            for c in cells:
                recs = [r for r in fam[a].values() if c in r["eval"]]
                m, h = interval([r["eval"][c]["accuracy"] for r in recs], [r["eval"][c]["se"] for r in recs]) \
                    if recs else (float("nan"), float("nan"))
                ms.append(m)
                hs.append(0 if math.isnan(h) else h)
            ax.errorbar(xs, ms, yerr=hs, marker="o", ms=3, capsize=2, label=names[a])
        c0 = any_rec["eval"][cells[0]] if cells else {}
        ax.set_title(title.format(L=c0.get("length"), P=c0.get("pairs")), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xkey)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{fam_name}: mean over seeds, 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


READING = "## Reading"
PLACEHOLDER = "_To be written after looking at the numbers above._"


def _kept_reading(out_md: Path) -> str | None:
    """The reading a person wrote under the last report of this name: writing
    the report again (e.g. after a plotting fix) keeps it."""
    if not out_md.is_file():
        return None
    text = out_md.read_text().partition("\n" + READING + "\n")[2].strip()
    return text if text and text != PLACEHOLDER else None


def write_report(results: Path, out_md: Path) -> dict:
    """Write the report (gates, criteria, a section per family) and its assets; returns each family's verdicts."""
    data = load(results)
    meta = data["meta"]
    fams = by_family(data)
    assets = out_md.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "results.json").write_text(json.dumps(data, indent=1))
    env, p, plan = meta["environment"], meta["preset"], meta.get("plan", {})
    md = ["# StateX capacity experiment: base vs LPT vs StateX where the state is the bottleneck", "",
          f"**Command:** `{meta['command']}`  ",
          f"**Date:** {meta['date_utc']}; wall clock {meta.get('elapsed_s', float('nan')):.0f} s of a "
          f"{meta['budget_s']:.0f} s budget  ",
          f"**Hardware:** {env['device']}{gpu_note(meta)}  ",
          "**Versions:** " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "host") and v)
          + "  ",
          f"**Corpus:** `{meta['corpus']['path']}` (crc32 {meta['corpus']['sha']})  ",
          "**Plan:** " + (f"stopped ({plan.get('reason')})" if plan.get("stop") else
                          f"steps x{plan.get('scale')} of nominal: {plan.get('pre_steps')} pre-training, "
                          f"{plan.get('post_steps')} post-training; projected {plan.get('projected_s', 0):.0f} s, "
                          f"decided at {plan.get('elapsed_at_plan_s', 0):.0f} s") + "  ",
          f"**Raw results:** [`{assets.name}/results.json`]({assets.name}/results.json)", "",
          f"Preset `{meta['preset_name']}`: d_model {p['d_model']}, {p['layers']} layers; GLA {p['gla_heads']} "
          f"heads, Mamba2 N {p['mamba2_state']}; layers {p['expand_layers']} expanded (GLA 1 head, Mamba2 N "
          f"{p['mamba2_expanded_state']}). "
          + (f"MQAR only first, {p['mqar_steps']} steps x {p['pre_batch']} x {p['mqar_seq']} (pairs "
             f"{p['mqar_pairs']}, lr {p['mqar_lr']:g}, never scaled); " if p.get("mqar_steps") else "")
          + f"Pre-training {p['pre_steps']} steps x {p['pre_batch']} x {p['pre_seq']} "
          f"(MQAR pairs {p['pre_pairs']}), post-training {p['post_steps']} steps x {p['post_batch']} x "
          f"{p['post_seq']} (pairs {p['post_pairs']}), nominal counts (the plan's scale applies); seeds "
          f"{meta['seeds']}.", ""]
    summary = {}
    md += ["## Gates (declared before the run)", "",
           f"1. The base recalls: MQAR accuracy >= {GATE_BASE:.0%} at the gate cell (mean over seeds).",
           f"2. The expanded architecture trained from scratch beats LPT by >= {100 * GATE_SCRATCH_MARGIN:.0f} points "
           "at 64 pairs (length 2K).", "", "A failed gate makes the run inconclusive, not negative.", "",
           "| family | gate 1: base at gate cell | gate 2: scratch - LPT at 64 pairs | verdict |", "|---|---|---|---|"]
    for name, fam in fams.items():
        v = summary[name] = verdicts(fam)
        g1, g2 = v["gates"]["base_recalls"], v["gates"]["scratch_beats_lpt"]
        md.append(f"| {name} | {_fmt(g1['mean'])}% ({', '.join(_fmt(x) for x in g1['per_seed'])}) "
                  f"{'PASS' if g1['pass'] else 'FAIL'} | {_fmt(g2['margin'])} points "
                  f"({_fmt(g2['scratch'])} vs {_fmt(g2['lpt_mean'])}) {'PASS' if g2['pass'] else 'FAIL'} | "
                  f"{v['verdict']} |")
    md += ["", "## Success criteria (per family)", "",
           f"StateX beats LPT in every seed, by >= {100 * WIN_MARGIN:.0f} points averaged over the capacity and "
           f"length cells; bits per byte within +{BPB_TOLERANCE} of LPT; passkey no more than "
           f"{100 * PASSKEY_TOLERANCE:.0f} points below LPT.", "",
           "The verdict is StateX's (the preset's expansion); the alternative expansion, where run, is judged "
           "by the same criteria below it.", "",
           "| family | arm | StateX - LPT per seed (points) | mean | bpb diff | passkey diff | met |",
           "|---|---|---|---:|---:|---:|---|"]
    for name, v in summary.items():
        for key, arm in (("success", "statex"), ("success_alt", "statex_alt")):
            if key not in v:
                continue
            s = v[key]
            md.append(f"| {name} | {arm_name(meta, name, arm)} | "
                      f"{', '.join(f'{k}: {_fmt(d)}' for k, d in s['statex_minus_lpt_per_seed'].items())} | "
                      f"{_fmt(s['mean'])} | {_fmt(s['bpb_diff_mean'], pct=False)} | {_fmt(s['passkey_diff_mean'])} | "
                      f"{'yes' if s['met'] else 'no'} ("
                      f"{', '.join(k for k, ok in s['criteria'].items() if not ok) or 'all'}"
                      f"{'' if s['met'] else ' failed'}) |")
    for name, fam in fams.items():
        names = {a: arm_name(meta, name, a) for a in ORDER}
        plot(name, fam, assets / f"{name}.png", names)
        md += ["", f"## {name}", "", f"![{name}]({assets.name}/{name}.png)", "", *table(fam, names), "",
               "Training:", "", *training_lines(fam, names)]
    md += ["", READING, "", _kept_reading(out_md) or PLACEHOLDER, ""]
    out_md.write_text("\n".join(md))
    return summary
