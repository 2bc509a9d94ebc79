"""vLLM model classes for our two families (imported only inside vLLM processes,
through the lazy names that ``model_registry.vllm_plugin.register`` gives vLLM).

- ``common``: the state page (every layer's state of one sequence in one vLLM
  page: no padding), the custom op around state-touching work, TP helpers, and
  the backbone / causal-LM shells both families share (weights through vLLM's
  ``AutoWeightsLoader``);
- ``gla``: ``StateXGLAForCausalLM`` (and ``GLAForCausalLM`` for fla-hub checkpoints);
- ``mamba2``: ``StateXMamba2ForCausalLM``.
"""
