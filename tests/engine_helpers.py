"""What the tests that run the native engine in-process share (imported by
name: pytest puts ``tests/`` on ``sys.path``)."""
from __future__ import annotations

import asyncio

from statex_serve.engine import EngineArgs
from statex_serve.engine.native import NativeEngine


def run_engine(model_dir: str, test, **kw):
    """Build an engine, start it in a fresh event loop, run ``await test(engine)``."""
    async def main():
        engine = NativeEngine(EngineArgs(model=model_dir, **kw))
        await engine.start()
        try:
            return await test(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())
