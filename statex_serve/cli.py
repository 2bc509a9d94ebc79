"""``statex-serve``: serve a checkpoint over the OpenAI-compatible HTTP API.

    statex-serve --model DIR [--backend native|vllm] [--port 8000] ...
    statex-serve serve DIR [...]          (vLLM's form; vLLM's option names work too)

Without --model it serves the bundled model (``statex_serve.bundled``) when
this build has one.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from statex_serve import __version__

if TYPE_CHECKING:
    from statex_serve.engine.args import EngineArgs

logger = logging.getLogger("statex_serve")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where the help text does not already say it
    (statex-serve and statex-train)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    """statex-serve's options, ours first, then vLLM's names for them."""
    p = argparse.ArgumentParser(prog="statex-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or the name of a bundled model (default: the bundled model)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in the 'model' field (default: --model as given)")
    p.add_argument("--host", default=os.environ.get("STATEX_HOST") or "127.0.0.1",
                   help="address to listen on, 0.0.0.0 for every interface (default: $STATEX_HOST, else "
                        "127.0.0.1; the Docker image sets STATEX_HOST=0.0.0.0)")
    p.add_argument("--port", type=_port, default=os.environ.get("STATEX_PORT") or "8000",
                   help="TCP port to listen on (default: $STATEX_PORT, else 8000)")
    p.add_argument("--backend", choices=("native", "vllm"), default="native",
                   help="native: the built-in engine; vllm: vLLM's AsyncLLM with our model plugin")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="weights and activations: auto (float32 on CPU; the checkpoint's half type or "
                        "bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--state-dtype", default="auto", help="recurrent state: auto (float32), float32, bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="state-pool size in sequences (default 64, or what --state-memory holds)")
    p.add_argument("--state-memory", default=None,
                   help="memory for the state pool, e.g. 2GiB or 512MiB: capacity = budget // bytes per "
                        "sequence (with --max-num-seqs too, the smaller wins)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per sequence (default: the checkpoint's "
                        "max_position_embeddings)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per engine step at most (default: 8192 on a GPU, 512 on "
                        "CPU); smaller keeps other streams smoother while a long prompt is read, larger "
                        "reads long prompts faster")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests allowed to wait for a state slot; beyond that the server answers 503")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="native engine: do not keep state snapshots of prompt prefixes (no reuse, no pinning)")
    p.add_argument("--prefix-cache-memory", default=None,
                   help="native engine: prefix-state snapshots kept on the device, e.g. 2GiB (default: on CUDA a "
                        "quarter of the memory free after the weights and state pools, at least 1GiB; elsewhere "
                        "1GiB; 0: none there)")
    p.add_argument("--prefix-cache-host-memory", default=None,
                   help="native engine: host memory that prefix snapshots spill to, least recently used first "
                        "(default 4GiB with CUDA, 0 on CPU where the device is host memory)")
    p.add_argument("--compile-cache-dir", default=None,
                   help="CUDA: where compiled kernels and autotune results persist, so a second start is fast "
                        "(default: $STATEX_CACHE_DIR, else ~/.cache/statex-serve)")
    p.add_argument("--autotune", choices=("fast", "full"), default="fast",
                   help="CUDA: fla's and mamba-ssm's prefill kernels try a few launch configs (fast) or all of them "
                        "(full: the best kernels, minutes more on the first start; both are cached)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize; repeat for "
                        "several keys, each its own prefix-cache namespace (a key given here shows in ps: prefer "
                        "--api-key-file or $STATEX_API_KEY) (default: $STATEX_API_KEY and $VLLM_API_KEY; none)")
    p.add_argument("--api-key-file", default=None,
                   help="a file of API keys, one per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--max-request-body", default="32MiB",
                   help="largest request body accepted, e.g. 32MiB; larger ones get 413 before they are read")
    p.add_argument("--default-max-tokens", type=int, default=8192,
                   help="max_tokens of a request that gives none (chat, or completions with null): what is left "
                        "of the context, at most this many tokens")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprob alternatives per position a request may ask for (logprobs, top_logprobs, "
                        "echoed prompt logprobs)")
    p.add_argument("--stream-stall-timeout", type=float, default=60.0,
                   help="native engine: seconds a streaming client may read nothing while its output is pending "
                        "(its sequence is paused meanwhile) before the request is aborted")
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="native engine: /health answers 503 while an engine step has run for longer than this "
                        "many seconds (a hung engine)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error", "critical"),
                   help="how much the server logs")
    p.add_argument("--version", action="version", version=f"statex-serve {__version__}")
    add_vllm_names(p)
    return p


def add_vllm_names(p: argparse.ArgumentParser) -> None:
    """The options a vLLM user types (``vllm serve --help``), beside ours."""
    g = p.add_argument_group("vLLM's names", "what `vllm serve` calls these; mapped onto this server's options")
    g.add_argument("--max-num-batched-tokens", dest="prefill_chunk", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="= --prefill-chunk: prompt tokens per engine step at most")
    g.add_argument("--enable-prefix-caching", dest="prefix_cache", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS, help="keep state snapshots of prompt prefixes (default: on; "
                   "--no-enable-prefix-caching = --no-prefix-cache)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="the fraction (0, 1] of the device's free memory (host memory on CPU) given to the "
                        "state pool, measured at start-up (instead of --state-memory)")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=None,
                   help="--backend vllm: GPUs per model replica (vLLM's tensor parallelism)")
    g.add_argument("--pipeline-parallel-size", type=int, default=None,
                   help="--backend vllm: pipeline stages (vLLM's pipeline parallelism)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template: a file, or the template itself (default: the tokenizer's)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for requests that give none, so a run of the same requests samples the same "
                        "(default: fresh randomness)")
    g.add_argument("--allowed-origins", default=None,
                   help="CORS: origins allowed to call the API from a browser, as a JSON list "
                        "('[\"https://app.example\"]', '[\"*\"]') or comma-separated (default: none)")
    g.add_argument("--root-path", default=None, help="the path prefix a proxy serves this server under")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=("debug", "info", "warning", "error", "critical", "trace"),
                   help="uvicorn's log level (default: --log-level)")
    g.add_argument("--disable-log-requests", action="store_true", help="no access-log line per request")


def serve_form(argv: list[str]) -> list[str]:
    """``serve MODEL ...`` (vLLM's form) -> ``--model MODEL ...``. Raises SystemExit."""
    if not argv or argv[0] != "serve":
        return argv
    argv = argv[1:]
    if argv and not argv[0].startswith("-"):
        if "--model" in argv or any(a.startswith("--model=") for a in argv):
            raise SystemExit(f"statex-serve: serve {argv[0]}: the model is given twice (positional and --model)")
        argv = ["--model", argv[0], *argv[1:]]
    return argv


def parse_origins(text: str) -> list[str]:
    """--allowed-origins: a JSON list of strings (vLLM's form) or comma-separated."""
    import json

    if text.strip().startswith("["):
        try:
            origins = json.loads(text)
        except ValueError as e:
            raise SystemExit(f"statex-serve: --allowed-origins: not a JSON list ({e})") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise SystemExit("statex-serve: --allowed-origins: a JSON list of strings is expected")
    else:
        origins = [o.strip() for o in text.split(",") if o.strip()]
    if not origins:
        raise SystemExit("statex-serve: --allowed-origins: no origin given")
    return origins


def read_chat_template(arg: str) -> str:
    """--chat-template: a file's text, or the argument itself when it is a Jinja template."""
    path = Path(arg)
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"statex-serve: --chat-template {arg}: cannot read it ({e})") from None
    if "{{" in arg or "{%" in arg:
        return arg
    raise SystemExit(f"statex-serve: --chat-template {arg}: no such file (nor an inline Jinja template)")


def state_memory_from_utilization(fraction: float, device: str) -> int:
    """--gpu-memory-utilization: bytes for the state pool, a fraction of the free memory of the device."""
    if not 0.0 < fraction <= 1.0:
        raise SystemExit(f"statex-serve: --gpu-memory-utilization must be in (0, 1], got {fraction}")
    from statex_serve.engine.loading import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(free * fraction))


def resolve_model(arg: str | None) -> tuple[str, str]:
    """(checkpoint directory, default served name). Raises SystemExit with a message."""
    try:
        from statex_serve import bundled
    except ModuleNotFoundError as e:
        if e.name != "statex_serve.bundled":
            raise
        bundled = None
    if arg is None:
        if bundled is None:
            raise SystemExit("statex-serve: --model is required (this build has no bundled model): "
                             "pass a checkpoint directory, e.g. --model ./my-checkpoint")
        try:
            path = Path(bundled.default_model_path())
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise SystemExit(f"statex-serve: no --model given and the bundled default is missing ({e}); "
                             "pass a checkpoint directory, e.g. --model ./my-checkpoint") from None
        return str(path), path.name
    if Path(arg).is_dir():
        # a checkpoint, or a `statex-train train` run directory (its model is in model/)
        from training.config import resolve_model_dir
        from training.errors import UsageError

        try:
            found = resolve_model_dir(arg)
        except UsageError as e:
            raise SystemExit(f"statex-serve: {e}") from None
        if found != Path(arg):
            logger.info("--model %s is a training run directory: serving its model, %s", arg, found)
        return str(found), arg
    if bundled is not None and hasattr(bundled, "model_path"):
        try:
            path = Path(bundled.model_path(arg))
            return str(path), arg
        except (KeyError, ValueError, FileNotFoundError):
            pass
    raise SystemExit(f"statex-serve: --model {arg}: no such checkpoint directory"
                     + (" or bundled model" if bundled is not None else ""))


def read_api_keys(args) -> list[str]:
    """--api-key (repeated), --api-key-file, else $STATEX_API_KEY and $VLLM_API_KEY. Raises SystemExit."""
    keys = [k for k in (args.api_key or []) if k]
    if args.api_key_file is not None:
        try:
            text = Path(args.api_key_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"statex-serve: --api-key-file {args.api_key_file}: cannot read it ({e})") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not from_file:
            raise SystemExit(f"statex-serve: --api-key-file {args.api_key_file}: no keys in it")
        keys += from_file
    if not keys:     # vLLM's variable too, so a vLLM deployment's environment works unchanged
        keys = [os.environ[v] for v in ("STATEX_API_KEY", "VLLM_API_KEY") if os.environ.get(v)]
    bad = next((k for k in keys if any(c.isspace() for c in k) or not k.isprintable()), None)
    if bad is not None:
        raise SystemExit("statex-serve: an API key must be printable and contain no spaces")
    return list(dict.fromkeys(keys))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


class ServerSettings(NamedTuple):
    """What main serves with, every argument checked."""
    engine_args: EngineArgs
    api_keys: list[str]
    max_body: int
    origins: list[str] | None
    chat_template: str | None


def check_settings(args, model_dir: str, default_name: str) -> ServerSettings:
    """The parsed arguments checked (in the order their errors are reported). Raises SystemExit."""
    from statex_serve.engine.args import EngineArgs, parse_budget, parse_memory_size   # light: fail fast

    try:
        state_memory = parse_memory_size(args.state_memory) if args.state_memory is not None else None
    except ValueError as e:
        raise SystemExit(f"statex-serve: --state-memory: {e}") from None
    try:
        max_body = parse_memory_size(args.max_request_body)
    except ValueError as e:
        raise SystemExit(f"statex-serve: --max-request-body: {e}") from None
    if args.default_max_tokens < 1:
        raise SystemExit(f"statex-serve: --default-max-tokens must be at least 1, got {args.default_max_tokens}")
    api_keys = read_api_keys(args)
    vllm_args = {k: v for k, v in (("tensor_parallel_size", args.tensor_parallel_size),
                                   ("pipeline_parallel_size", args.pipeline_parallel_size)) if v is not None}
    for name, v in vllm_args.items():
        if v < 1:
            raise SystemExit(f"statex-serve: --{name.replace('_', '-')} must be at least 1, got {v}")
        if v > 1 and args.backend != "vllm":
            raise SystemExit(f"statex-serve: --{name.replace('_', '-')} {v} needs --backend vllm (the native "
                             "engine runs on one device)")
    origins = parse_origins(args.allowed_origins) if args.allowed_origins is not None else None
    chat_template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    if args.gpu_memory_utilization is not None:
        if state_memory is not None:
            raise SystemExit("statex-serve: give --state-memory or --gpu-memory-utilization, not both")
        state_memory = state_memory_from_utilization(args.gpu_memory_utilization, args.device)
        logger.info("--gpu-memory-utilization %g: %d bytes for the state pool", args.gpu_memory_utilization,
                    state_memory)
    budgets = {}
    for name in ("prefix_cache_memory", "prefix_cache_host_memory"):
        value = getattr(args, name)
        try:
            budgets[name] = parse_budget(value) if value is not None else None
        except ValueError as e:
            raise SystemExit(f"statex-serve: --{name.replace('_', '-')}: {e}") from None

    try:
        engine_args = EngineArgs(
            model=model_dir, served_model_names=args.served_model_name or [default_name], device=args.device,
            dtype=args.dtype, state_dtype=args.state_dtype, max_num_seqs=args.max_num_seqs,
            state_memory=state_memory,
            max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
            prefix_cache=args.prefix_cache, compile_cache_dir=args.compile_cache_dir,
            autotune=args.autotune, max_logprobs=args.max_logprobs,
            stream_stall_timeout=args.stream_stall_timeout, step_timeout=args.step_timeout,
            tokenizer=args.tokenizer, seed=args.seed, vllm_args=vllm_args, **budgets)
    except ValueError as e:
        raise SystemExit(f"statex-serve: {e}") from None

    return ServerSettings(engine_args, api_keys, max_body, origins, chat_template)


def main(argv: list[str] | None = None) -> int:
    """statex-serve: check the arguments, build the engine, serve until stopped; returns the exit status."""
    args = build_parser().parse_args(serve_form(list(sys.argv[1:] if argv is None else argv)))
    configure_logging(args.log_level)
    model_dir, default_name = resolve_model(args.model)
    engine_args, api_keys, max_body, origins, chat_template = check_settings(args, model_dir, default_name)

    # heavy imports after the arguments are checked, so --help and mistakes are answered at once
    import uvicorn

    from model_registry.checkpoint import CheckpointError
    from model_registry.configs import ConfigError
    from statex_serve.api import create_app
    from statex_serve.engine import create_engine

    try:
        engine = create_engine(engine_args, args.backend)
    except (ValueError, CheckpointError, ConfigError, RuntimeError, OSError) as e:
        logger.error("cannot start: %s", e)
        return 2
    if chat_template is not None:
        engine.tokenizer.chat_template = chat_template
    logger.info("serving %s as %s (backend %s) on http://%s:%d%s", model_dir, engine.model_name, args.backend,
                args.host, args.port, f" with {len(api_keys)} API key(s)" if api_keys else "")
    died = []

    def on_engine_death():    # stop serving and exit non-zero, so a supervisor restarts the server
        died.append(True)
        server.should_exit = True

    app = create_app(engine, api_key=api_keys or None, max_request_body=max_body,
                     default_max_tokens=args.default_max_tokens, on_engine_death=on_engine_death,
                     allowed_origins=origins)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level, log_config=None,
        timeout_graceful_shutdown=5, root_path=args.root_path or "", ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, access_log=not args.disable_log_requests))
    server.run()
    if died:
        logger.error("exiting: the engine died")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
