"""Check a running statex-serve (any OpenAI-compatible URL) end to end: it lists
its model, completes a prompt and a chat, and, with --passkey, answers passkey
questions at >= 1K tokens exactly. Used by the Docker smoke test and as a manual
check of the bundled model:

    python scripts/check_served_model.py --base-url http://127.0.0.1:8000 --wait 120 [--passkey]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import httpx

try:
    from openai import OpenAI
except ModuleNotFoundError:     # `make serve` installs the server only; the client comes with `make test`
    sys.exit("check_served_model.py: needs the openai client: .venv/bin/pip install openai (or run make test)")

from training.tasks import passkey


class ByteCodec:
    """The bundled model's byte-level tokenizer: token id == UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def wait_healthy(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {base_url}/health did not answer 200 within {timeout:.0f}s")
        time.sleep(1)


def main() -> int:
    """Run the checks against --base-url: 0 when every one passes, else 1."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--length", type=int, default=1100, help="prompt length in tokens (bytes)")
    ap.add_argument("--seeds", default="1,2,3", help="one passkey prompt per seed")
    ap.add_argument("--wait", type=float, default=0, help="seconds to wait for /health first")
    ap.add_argument("--passkey", action="store_true", help="also require exact passkey answers")
    args = ap.parse_args()
    if args.wait:
        wait_healthy(args.base_url, args.wait)
    client = OpenAI(base_url=f"{args.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    text = client.completions.create(model=model, prompt="The function returns", max_tokens=24,
                                     temperature=0).choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=16, temperature=0).choices[0].message.content
    print(f"model {model}: completion {text!r}; chat {chat!r}")
    if not text or chat is None:
        print("error: empty completion or chat answer", file=sys.stderr)
        return 1
    if not args.passkey:
        return 0
    failures = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        sample = passkey(random.Random(seed), ByteCodec(), args.length, depth=random.Random(seed).random())
        start, _ = sample.spans[0]
        prompt = bytes(sample.ids[:start]).decode("utf-8")
        key = sample.meta["key"]
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        text = out.choices[0].text
        ok = text.strip().startswith(key)
        failures += not ok
        print(f"seed {seed}: {len(sample.ids[:start])} prompt tokens, depth {sample.meta['depth']:.2f}, "
              f"key {key}, answer {text!r}: {'ok' if ok else 'WRONG'}")
    if failures:
        print(f"error: {failures} passkey answer(s) wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
