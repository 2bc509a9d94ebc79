"""statex-serve: an OpenAI-compatible server for recurrent LMs with expanded state.

``statex_serve.engine`` holds the engines (the built-in one and the vLLM
adapter) behind one interface (``statex_serve.engine.base``);
``statex_serve.api`` is the HTTP layer over that interface; ``statex_serve.cli``
is the ``statex-serve`` command.
"""
__version__ = "0.1.0"
