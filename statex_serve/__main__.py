"""``python -m statex_serve`` is the ``statex-serve`` command."""
from statex_serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
