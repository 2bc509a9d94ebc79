"""``python -m statex_serve.bench``: long-context latency, recall accuracy and
memory of a served model, alone or two side by side.

Modules: ``targets`` (what is measured: a URL, a spawned ``statex-serve``, the
in-process engine), ``latency``, ``recall``, ``memory``, ``compare`` (the
suites), ``modelinfo`` (weights, state, KV cache, the decode floor),
``report`` and ``plots`` (JSON, Markdown, PNG), ``cli`` (the command).
"""
