"""Memory suite: what one sequence costs and how many fit in a budget, vs context
length, for each model next to a Llama-style Transformer of the same size whose
KV cache grows with the context. The KV formula is checked against the cache a
real (tiny) transformers ``LlamaForCausalLM`` holds; a served model's state
size is checked against what its engine reports for its pool."""
from __future__ import annotations

from dataclasses import dataclass

from statex_serve.bench.modelinfo import ModelFacts, load_facts, matched_transformer, measure_llama_kv


@dataclass
class MemoryConfig:
    contexts: list[int]
    budget_bytes: int
    models: list[str]                 # presets or checkpoint directories
    kv_heads: int | None = None
    kv_dtype: str | None = None       # None: the model's weight dtype
    weights_dtype: str | None = None  # None: bfloat16 for presets, served/config dtype for checkpoints
    state_dtype: str = "float32"
    check_contexts: tuple[int, ...] = (16, 64, 256)


def model_rows(facts: ModelFacts, tf: ModelFacts, contexts: list[int], budget: int) -> list[dict]:
    rows = []
    for ctx in contexts:
        ours, theirs = facts.bytes_per_sequence(ctx), tf.bytes_per_sequence(ctx)
        rows.append({"context": ctx, "bytes_per_sequence": ours, "max_sequences": facts.max_sequences(budget, ctx),
                     "transformer_bytes_per_sequence": theirs,
                     "transformer_max_sequences": tf.max_sequences(budget, ctx),
                     "transformer_over_model": theirs / ours})
    return rows


def entry(facts: ModelFacts, cfg: MemoryConfig, served: dict | None = None, label: str | None = None) -> dict:
    kv_dtype = cfg.kv_dtype or facts.weights_dtype
    tf = facts if not facts.recurrent else matched_transformer(facts, cfg.kv_heads, kv_dtype)
    out = {"label": label or facts.name, "model": facts.to_dict(), "transformer": tf.to_dict(),
           "rows": model_rows(facts, tf, cfg.contexts, cfg.budget_bytes)}
    if served and served.get("state_bytes_per_sequence") is not None:
        reported = served["state_bytes_per_sequence"]
        slots = served.get("state_pool_slots")
        pool = served.get("state_pool_bytes")
        out["served"] = {"state_bytes_per_sequence": reported, "state_pool_slots": slots,
                         "state_pool_bytes": pool, "matches_config": reported == facts.state_bytes_per_sequence,
                         "pool_bytes_per_slot": (pool // slots) if pool and slots else None}
    return out


def run_memory(cfg: MemoryConfig, served_models: list[tuple[str, str, dict]], log=None) -> dict:
    """``served_models``: (label, checkpoint dir, engine description) of the targets."""
    entries, unsized = [], []
    for label, model_dir, desc in served_models:
        try:
            facts = load_facts(model_dir, cfg.weights_dtype or desc.get("dtype"),
                               desc.get("state_dtype") or cfg.state_dtype, cfg.kv_dtype or "bfloat16")
        except (ValueError, OSError, KeyError) as e:     # e.g. an upstream model type we do not size
            unsized.append({"label": label, "model_dir": model_dir, "reason": str(e).strip().splitlines()[0]})
            continue
        entries.append(entry(facts, cfg, desc, label))
    for src in cfg.models:
        facts = load_facts(src, cfg.weights_dtype, cfg.state_dtype, cfg.kv_dtype or "bfloat16")
        entries.append(entry(facts, cfg))
        if log:
            log(f"memory: {facts.name}")
    check = measure_llama_kv(list(cfg.check_contexts))
    return {"budget_bytes": cfg.budget_bytes, "contexts": cfg.contexts, "entries": entries, "unsized": unsized,
            "llama_kv_check": {"model": "LlamaForCausalLM 2 layers, 4 heads, 2 KV heads, head_dim 16, fp32, CPU",
                               "rows": check, "all_match": all(r["match"] for r in check)}}
