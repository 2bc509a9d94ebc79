"""The OpenAI-compatible HTTP layer over an ``Engine`` (``create_app``)."""
from statex_serve.api.app import create_app

__all__ = ["create_app"]
