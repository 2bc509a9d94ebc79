"""``python -m statex_serve.bench``: see ``statex_serve.bench.cli``."""
from statex_serve.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
