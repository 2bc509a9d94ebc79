"""Measure the state bytes per sequence that vLLM charges for a model, against
the true size (``config.state_spec().bytes_per_sequence``).

    python -m model_registry.vllm_models.measure_state [--models tiny-gla,gla-1.3b] [--layouts packed,per_layer]

Each (model, layout) runs in a fresh process: an in-process vLLM engine on a
config-only checkpoint (``load_format=dummy``, no tokenizer) with a fixed state
budget (``VLLM_CPU_KVCACHE_SPACE``). Two readings from vLLM itself:

- ``log``: budget / the "Maximum concurrency for N tokens per request" that
  vLLM logs (what an operator sees; rounded down to whole blocks);
- ``config``: the bytes vLLM allocated (its KV cache config) / that concurrency
  (exact).

Layouts: ``packed`` (default: one state page per sequence, no padding),
``per_layer`` (one vLLM state layer per model layer: vLLM pads every page to
the largest layer's). Add ``:blnhc`` (e.g. ``per_layer:blnhc``) to run with
``VLLM_KV_CACHE_LAYOUT=BLNHC``, vLLM's own block-packing of mixed page sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1 << 30

# name -> (family, config kwargs); None: the 1.3B shape with the paper's StateX
# expansion (``configs.statex_1p3b_config``: fla-hub/gla-1.3B-100B with 4 of 24
# layers merged to one head, state-spaces mamba2-1.3b with 4 of 48 at 4x d_state).
MODELS = {
    "tiny-gla": ("gla", dict(vocab_size=259, hidden_size=64, num_hidden_layers=4, num_heads=4,
                             layer_num_heads=[1, 4, 1, 4], expand_k=0.5, expand_v=1.0, intermediate_size=128)),
    "tiny-mamba2": ("mamba2", dict(vocab_size=259, hidden_size=64, num_hidden_layers=4, state_size=16,
                                   layer_state_size=[64, 16, 64, 16], head_dim=16, expand=2, n_groups=1,
                                   chunk_size=32)),
    "gla-1.3b": ("gla", None),
    "mamba2-1.3b": ("mamba2", None),
}


def write_config(name: str, out: Path, dtype: str) -> int:
    """config.json for MODELS[name] in ``out``; returns the true bytes per sequence."""
    from model_registry.configs import StateXGLAConfig, StateXMamba2Config, statex_1p3b_config
    from model_registry.dtypes import parse_dtype

    family, kw = MODELS[name]
    if kw is None:
        cfg = statex_1p3b_config(family, dtype=dtype)
    else:
        cfg = (StateXGLAConfig if family == "gla" else StateXMamba2Config)(**kw, dtype=dtype)
    cfg.architectures = ["StateXGLAForCausalLM" if family == "gla" else "StateXMamba2ForCausalLM"]
    cfg.save_pretrained(out)
    return cfg.state_spec(conv_dtype=parse_dtype(dtype)).bytes_per_sequence


def measure_one(model_dir: str, budget_gib: int, dtype: str) -> dict:
    """Run in a fresh process (environment already set)."""
    from vllm import LLM

    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, max_model_len=2048,
              max_num_seqs=4, enforce_eager=True)
    core = llm.llm_engine.engine_core.engine_core
    kv = core.scheduler.kv_cache_config
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    conc = get_max_concurrency_for_kv_cache_config(core.vllm_config, kv)
    # KV cache groups alias one pool from byte 0: the pool is the largest tensor
    allocated = max(t.size for t in kv.kv_cache_tensors)
    pages = sorted({g.kv_cache_spec.page_size_bytes for g in kv.kv_cache_groups})
    return {"concurrency": conc, "allocated_bytes": allocated, "num_blocks": kv.num_blocks,
            "groups": len(kv.kv_cache_groups), "page_sizes": pages, "budget_bytes": int(budget_gib * GIB)}


def run(name: str, layout: str, budget_gib: int, dtype: str, workdir: Path) -> dict:
    model_dir = workdir / name
    true_bytes = write_config(name, model_dir, dtype)
    layout, _, variant = layout.partition(":")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(budget_gib),
               STATEX_VLLM_STATE_LAYOUT=layout)
    if variant == "blnhc":
        env["VLLM_KV_CACHE_LAYOUT"] = "BLNHC"
    code = ("import json, sys; from model_registry.vllm_models.measure_state import measure_one;"
            f"print('RESULT', json.dumps(measure_one({str(model_dir)!r}, {budget_gib}, {dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    res = next((json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines() if line.startswith("RESULT ")),
               None)
    if proc.returncode or res is None:
        raise RuntimeError(f"{name}/{layout}: vLLM run failed:\n{out[-4000:]}")
    m = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", out)
    res["log_concurrency"] = float(m.group(1)) if m else None
    res.update(model=name, layout=layout + (f":{variant}" if variant else ""), true_bytes=true_bytes)
    res["bytes_per_seq_config"] = res["allocated_bytes"] / res["concurrency"]
    res["bytes_per_seq_log"] = res["budget_bytes"] / res["log_concurrency"] if res["log_concurrency"] else None
    res["ratio"] = res["bytes_per_seq_config"] / res["true_bytes"]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-gla,tiny-mamba2")
    ap.add_argument("--layouts", default="per_layer,packed")
    ap.add_argument("--budget-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for layout in args.layouts.split(","):
                r = run(name, layout, args.budget_gib, args.dtype, Path(tmp))
                rows.append(r)
                log = f"{r['bytes_per_seq_log']:,.0f}" if r["bytes_per_seq_log"] else "-"
                print(f"{name:12s} {r['layout']:16s} concurrency {r['log_concurrency']:>10} "
                      f"vLLM B/seq (log) {log:>14} (config) {r['bytes_per_seq_config']:>14,.0f} "
                      f"true {r['true_bytes']:>14,} ratio {r['ratio']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
