"""Superseded by statex_capacity.py; kept for the history of
docs/experiments/reproduce_small.md.

Small-scale StateX reproduction: pre-train a tiny GLA and Mamba2 on our data,
then post-train each two ways with the same budget, LPT (unchanged model) and
StateX (expanded state), and compare recall vs context length and held-out
perplexity for base, LPT and StateX.

    # once, here: a deterministic corpus (the Python standard library's source)
    python -m training.experiments.reproduce_small prepare --out .exp_corpus
    # the run (GPU preset; `--preset cpu-mini` runs the same pipeline in ~2 min on CPU)
    python -m training.experiments.reproduce_small run --corpus .exp_corpus --out results/ --preset gpu

Fairness: LPT runs under a time budget and StateX then runs exactly LPT's
number of steps, on the same data stream (same seed), schedule and batch.
Outputs (few files, so they fit the device tool's return limits):
results.json, results.md, recall_<family>.png, loss_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model_registry.checkpoint import load_model, save_checkpoint
from model_registry.configs import StateXGLAConfig, StateXMamba2Config
from model_registry.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, save_byte_tokenizer
from training import report
from training.data import TextCodec
from training.eval import EvalConfig, evaluate_model
from training.expand import expand_checkpoint
from training.train import TrainConfig, run as train_run

CORPUS_FILE = "python_stdlib.jsonl"


@dataclass
class Preset:
    hidden: int
    layers: int
    expand_every: int
    mamba2_state: int
    pre_seq: int
    pre_batch: int
    pre_steps: int              # upper bound; the time budget usually decides
    pre_budget_s: float | None
    post_seq: int
    post_batch: int
    post_steps: int
    post_budget_s: float | None
    pre_lr: float = 2e-3
    post_lr: float = 1e-3
    # byte-level prompts: a passkey prompt needs ~260 tokens (training.tasks refuses shorter lengths)
    eval_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    eval_samples: int = 16
    eval_batch: int = 8
    ppl_tokens: int = 262144
    ppl_seq: int = 1024


PRESETS = {
    # about 6 minutes of H200 time for both families (budgets below + evaluation + Triton compilation)
    "gpu": Preset(hidden=256, layers=6, expand_every=3, mamba2_state=16, pre_seq=512, pre_batch=32,
                  pre_steps=4000, pre_budget_s=60, post_seq=2048, post_batch=8, post_steps=2000, post_budget_s=25),
    # the same pipeline in miniature, for developing the script on a CPU
    "cpu-mini": Preset(hidden=64, layers=4, expand_every=2, mamba2_state=8, pre_seq=128, pre_batch=4,
                       pre_steps=16, pre_budget_s=None, post_seq=256, post_batch=2, post_steps=8, post_budget_s=None,
                       eval_lengths=[320, 400], eval_samples=4, eval_batch=4, ppl_tokens=4096, ppl_seq=128),
}
# seconds held back per family for post-training, evaluation and compilation
FAMILY_BUDGET_SCALE = {"gla": 1.0, "mamba2": 0.6}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- corpus ------------------------------------------------------------------------------

def prepare_corpus(out: Path, src: Path | None = None, max_bytes: int = 12 << 20) -> Path:
    """The Python standard library's own source (tests and IDLE left out), one
    JSON line per file, in path order: a deterministic, offline text corpus.
    Train/held-out is decided later by a hash of the line number (split=)."""
    src = src or Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not src.is_dir():
        src = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib")
    files = sorted(p for p in src.rglob("*.py") if not any(part in skip for part in p.relative_to(src).parts))
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    with (out / CORPUS_FILE).open("w") as f:
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if total + len(text) > max_bytes:
                break
            f.write(json.dumps({"path": str(p.relative_to(src)), "text": text}) + "\n")
            total += len(text)
    log(f"corpus: {total / 2**20:.1f} MiB of Python source from {src} -> {out / CORPUS_FILE}")
    return out / CORPUS_FILE


def data_specs(corpus: Path, max_len: int) -> list[str]:
    """Text plus the three recall tasks, synthetic documents up to ``max_len`` tokens."""
    lo = max(32, max_len // 8)
    return [f"jsonl:{corpus}?split=train@0.4",
            f"mqar?min_len={lo}&max_len={max_len}@0.3",
            f"passkey?min_len={lo}&max_len={max_len}@0.15",
            f"niah?min_len={lo}&max_len={max_len}@0.15"]


# --- models ------------------------------------------------------------------------------

def base_config(family: str, p: Preset):
    common = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=p.hidden, num_hidden_layers=p.layers,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if family == "gla":   # fla-hub GLA's shape at small width: 4 heads, expand_k 0.5, expand_v 1
        return StateXGLAConfig(num_heads=4, expand_k=0.5, expand_v=1.0, tie_word_embeddings=False, **common)
    return StateXMamba2Config(state_size=p.mamba2_state, head_dim=64, expand=2, n_groups=1, chunk_size=64,
                              tie_word_embeddings=True, **common)


def init_checkpoint(family: str, p: Preset, out: Path, seed: int = 0) -> Path:
    from model_registry import StateXGLAForCausalLM, StateXMamba2ForCausalLM

    torch.manual_seed(seed)
    cls = StateXGLAForCausalLM if family == "gla" else StateXMamba2ForCausalLM
    model = cls(base_config(family, p))
    tok = out.parent / ".byte-tokenizer"
    save_byte_tokenizer(tok)
    save_checkpoint(model, out, tokenizer_src=tok, provenance={"kind": "random init", "seed": seed},
                    overwrite=True)
    shutil.rmtree(tok, ignore_errors=True)
    return out


# --- fast kernels vs the torch reference on this model (issue item 5) ------------------

def kernel_check(model_dir: Path, corpus: Path, p: Preset) -> dict:
    """Loss and gradients of one batch through the CUDA kernels (fla chunk_gla /
    mamba-ssm chunk scan) and through the torch reference, fp32 and bf16."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    from training.data import build_stream

    codec = TextCodec.from_model_dir(model_dir)
    x, y = build_stream(data_specs(corpus, p.post_seq), codec, p.post_seq, seed=99).next_batch(2)
    model = load_model(model_dir, device="cuda").train()
    x, y = x.cuda(), y.cuda()
    out: dict = {}
    for precision in ("bf16",):           # what training runs; tests/gpu checks fp32 tightly
        res = {}
        for mode in ("auto", "reference"):
            os.environ["STATEX_KERNELS"] = mode
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
                    loss = model(x, labels=y).loss
                loss.backward()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a broken kernel is a finding, not a crash
                res[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
                continue
            grads = torch.cat([q.grad.float().flatten() for q in model.parameters() if q.grad is not None])
            res[mode] = {"loss": loss.item(), "grads": grads, "seconds_first_call": time.perf_counter() - t0}
        entry = {k: {kk: vv for kk, vv in v.items() if kk != "grads"} for k, v in res.items()}
        if all("loss" in res[m] for m in res):
            a, r = res["auto"], res["reference"]
            entry["loss_rel_err"] = abs(a["loss"] - r["loss"]) / abs(r["loss"])
            entry["grad_rel_err"] = ((a["grads"] - r["grads"]).norm() / r["grads"].norm()).item()
        out[precision] = entry
    os.environ["STATEX_KERNELS"] = "auto"
    ok = all("grad_rel_err" in out[pr] and out[pr]["loss_rel_err"] < 1e-2 and out[pr]["grad_rel_err"] < 0.1
              for pr in out)
    out["train_kernels"] = "fast" if ok else "reference"
    return out


# --- one family --------------------------------------------------------------------------

def read_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines() if line]


def train(model: Path, out: Path, corpus: Path, p: Preset, seq: int, batch: int, steps: int, budget: float | None,
          lr: float, warmup: int) -> dict:
    cfg = TrainConfig(model=str(model), out=str(out), data=data_specs(corpus, seq), seq_len=seq, batch_size=batch,
                      max_steps=steps, lr=lr, warmup_steps=warmup, min_lr_ratio=0.1, save_every=10**9,
                      keep_checkpoints=1, seed=0, time_budget_s=budget, overwrite=True, progress=False)
    t0 = time.perf_counter()
    last = [t0]

    def progress(step: int, rec: dict) -> None:   # a line every ~20 s, so a log shows where time goes
        if time.perf_counter() - last[0] > 20:
            last[0] = time.perf_counter()
            log(f"  {out.name} step {step}: loss {rec['loss']:.4f}, {rec['tok_per_s']:,.0f} tok/s")

    summary = train_run(cfg, on_step=progress)
    summary["wall_s"] = time.perf_counter() - t0
    losses = read_losses(out)
    summary["loss_first"], summary["loss_last10"] = losses[0], sum(losses[-10:]) / len(losses[-10:])
    log(f"trained {out.name}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
        f"{summary['wall_s']:.0f}s, loss {losses[0]:.3f} -> {summary['loss_last10']:.3f}")
    return summary


def evaluate(model_dir: Path, label: str, corpus: Path, p: Preset) -> dict:
    # evaluate through the torch reference: the oracle, and independent of the
    # serving kernels' state of development (training used --kernels)
    prev = os.environ.get("STATEX_KERNELS", "auto")
    os.environ["STATEX_KERNELS"] = "reference"
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(model_dir, device=device).eval()
        cfg = EvalConfig(model=str(model_dir), out="", lengths=p.eval_lengths, samples=p.eval_samples,
                         batch_size=p.eval_batch, heldout=f"jsonl:{corpus}?split=heldout", ppl_seq_len=p.ppl_seq,
                         ppl_tokens=p.ppl_tokens, check_generate=1, label=label)
        t0 = time.perf_counter()
        res = evaluate_model(model, TextCodec.from_model_dir(model_dir), cfg, log=lambda m: log(f"  {label}: {m}"))
        res["eval_seconds"] = time.perf_counter() - t0
        return res
    finally:
        os.environ["STATEX_KERNELS"] = prev


def run_family(family: str, p: Preset, corpus: Path, work: Path, budget_scale: float, kernels: str,
               result: dict, save) -> dict:
    """Fills ``result`` phase by phase and calls ``save()`` after each, so an
    interrupted run still returns what finished."""
    fw = work / family

    def scaled(budget: float | None) -> float | None:
        return None if budget is None else budget * budget_scale

    result["family"] = family
    init = init_checkpoint(family, p, fw / "init")
    if kernels == "auto":
        # the first call compiles and autotunes the Triton kernels: minutes on a fresh machine
        result["kernel_check"] = kernel_check(init, corpus, p)
        log(f"{family} kernel check: {json.dumps(result['kernel_check'])}")
        kernels = "auto" if result["kernel_check"].get("train_kernels", "fast") == "fast" else "reference"
    else:
        result["kernel_check"] = {"skipped": "--kernels reference", "train_kernels": "reference"}
    os.environ["STATEX_KERNELS"] = kernels
    save()
    result["pretrain"] = train(init, fw / "pretrain", corpus, p, p.pre_seq, p.pre_batch, p.pre_steps,
                               scaled(p.pre_budget_s), p.pre_lr, warmup=50 if p.pre_budget_s else 4)
    save()
    base = fw / "pretrain" / "model"
    result["lpt"] = train(base, fw / "lpt", corpus, p, p.post_seq, p.post_batch, p.post_steps,
                          scaled(p.post_budget_s), p.post_lr, warmup=20 if p.post_budget_s else 2)
    save()
    n = result["lpt"]["steps"]
    kw = {"heads": 1} if family == "gla" else {"state_size": 4 * p.mamba2_state}
    result["expansion"] = expand_checkpoint(str(base), str(fw / "statex_init"), every=p.expand_every,
                                            init="reinit", seed=0, overwrite=True, **kw)
    result["statex"] = train(fw / "statex_init", fw / "statex", corpus, p, p.post_seq, p.post_batch, n, None,
                             p.post_lr, warmup=20 if p.post_budget_s else 2)
    result["loss_curves"] = {k: read_losses(fw / k) for k in ("pretrain", "lpt", "statex")}
    save()
    evals: dict = {}
    for label, d in (("base", base), ("LPT", fw / "lpt" / "model"), ("StateX", fw / "statex" / "model")):
        evals[label] = evaluate(d, label, corpus, p)
        result["eval_partial"] = evals
        save()
    result["eval"] = result.pop("eval_partial")
    return result


# --- outputs -----------------------------------------------------------------------------

def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = [f"# StateX small-scale reproduction ({results['preset_name']} preset)", "",
          f"device: {results['device']}; torch {results['torch']}", ""]
    for fam, r in results["families"].items():
        if "eval" not in r:
            continue
        e = r["expansion"]
        md += [f"## {fam}", "",
               f"- pre-training: {r['pretrain']['steps']} steps, {r['pretrain']['tokens']:,} tokens "
               f"(seq {results['preset']['pre_seq']}), final loss {r['pretrain']['loss_last10']:.4f}",
               f"- LPT: {r['lpt']['steps']} steps, {r['lpt']['tokens']:,} tokens (seq {results['preset']['post_seq']}),"
               f" final loss {r['lpt']['loss_last10']:.4f}",
               f"- StateX: layers {e['layers']} expanded ({e['method']}, {e['init']}); parameters "
               f"+{e['parameters']['added']:,}; state x{e['state']['ratio']:.2f}; {r['statex']['steps']} steps, "
               f"{r['statex']['tokens']:,} tokens, final loss {r['statex']['loss_last10']:.4f}",
               f"- training kernels: {r['kernel_check'].get('train_kernels', 'n/a')}", "",
               report.markdown(r["eval"]), ""]
    (out / "results.md").write_text("\n".join(md))
    for fam, r in results["families"].items():
        if "eval" in r:
            report.plot_recall(r["eval"], out / f"recall_{fam}.png", title=f"{fam}: base vs LPT vs StateX")
    plot_losses(results, out / "loss_curves.png")


def _smooth(xs: list[float]) -> list[float]:
    """Trailing mean over ~2% of the curve: the per-step loss of a data mixture is noisy."""
    w = max(1, len(xs) // 50)
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def plot_losses(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f, r in results["families"].items() if "loss_curves" in r]
    if not fams:
        return
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        curves = results["families"][fam]["loss_curves"]
        n_pre = len(curves["pretrain"])
        ax.plot(range(1, n_pre + 1), _smooth(curves["pretrain"]), label="pre-training", lw=0.8)
        for k, name in (("lpt", "LPT"), ("statex", "StateX")):
            ax.plot(range(n_pre + 1, n_pre + 1 + len(curves[k])), _smooth(curves[k]), label=name, lw=0.8)
        ax.set_title(fam)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_ylim(top=min(6.0, max(max(c) for c in curves.values())))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    """Each family in turn (skipped when the deadline would not allow it), results written after every phase."""
    p = PRESETS[args.preset]
    corpus = Path(args.corpus) / CORPUS_FILE
    if not corpus.is_file():
        raise SystemExit(f"no corpus at {corpus}: run `prepare` first")
    out, work = Path(args.out), Path(args.work)
    t_start = time.perf_counter()
    results = {"preset_name": args.preset, "preset": asdict(p), "budget_scale": args.budget_scale,
               "command": " ".join(sys.argv), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "families": {}}
    for fam in args.families.split(","):
        used = time.perf_counter() - t_start
        need = (p.pre_budget_s or 0) + 2 * (p.post_budget_s or 0)
        if args.deadline_s and used + FAMILY_BUDGET_SCALE[fam] * args.budget_scale * need + 40 > args.deadline_s:
            log(f"skipping {fam}: {used:.0f}s used, not enough left before the {args.deadline_s}s deadline")
            results["families"][fam] = {"skipped": f"deadline ({used:.0f}s used of {args.deadline_s}s)"}
            continue
        log(f"=== {fam} ===")
        entry = results["families"][fam] = {}

        def save() -> None:
            results["elapsed_s"] = time.perf_counter() - t_start
            write_outputs(results, out)

        try:
            run_family(fam, p, corpus, work, FAMILY_BUDGET_SCALE[fam] * args.budget_scale, args.kernels, entry,
                       save)
        except Exception as e:  # noqa: BLE001 - keep the other family's results
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"
        save()
    log(f"done in {time.perf_counter() - t_start:.0f}s -> {out}")
    return results


def main(argv=None) -> int:
    """``prepare`` the corpus or ``run`` the experiment."""
    ap = argparse.ArgumentParser(prog="reproduce_small", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the text corpus (JSONL)")
    pp.add_argument("--out", required=True)
    pp.add_argument("--src", help="Python stdlib directory (default: this interpreter's)")
    pp.add_argument("--max-mb", type=float, default=12)
    pr = sub.add_parser("run", help="pre-train, post-train (LPT and StateX), evaluate")
    pr.add_argument("--corpus", required=True, help="directory written by `prepare`")
    pr.add_argument("--out", required=True, help="results directory")
    pr.add_argument("--work", default="/tmp/statex-repro", help="checkpoints and logs (large)")
    pr.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    pr.add_argument("--families", default="gla,mamba2")
    pr.add_argument("--deadline-s", type=float, help="skip a family that would not finish before this")
    pr.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply the preset's training time budgets (e.g. 2.5 when the GPU is shared "
                         "with other runs, or for a longer experiment)")
    pr.add_argument("--kernels", default="reference", choices=("reference", "auto"),
                    help="train through the torch reference (predictable; no Triton compilation) or the "
                         "CUDA kernels (fla chunk_gla, mamba-ssm), checked against the reference first")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare_corpus(Path(args.out), Path(args.src) if args.src else None, int(args.max_mb * 2**20))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
