"""Start one SGLang runtime worker (`python -m sglang.launch_server`) for the `sglang` engine.

SGLang needs a GPU and pins its own CUDA torch, so it is an optional extra (`pip install .[gpu]`)
and this module never imports it: it checks that it is installed, builds the command line and
replaces itself with the server. Register the worker's URL in the models registry as a deployment
of an `sglang` model; the inference service health-checks it through `/health_generate`.

    python -m services.inference.sglang_launcher --model-path Qwen/Qwen2.5-0.5B-Instruct --port 30000
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_path,
           "--host", args.host, "--port", str(args.port)]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    if args.context_length:
        cmd += ["--context-length", str(args.context_length)]
    if args.tp > 1:
        cmd += ["--tp", str(args.tp)]
    if args.mem_fraction_static:
        cmd += ["--mem-fraction-static", str(args.mem_fraction_static)]
    return cmd + extra


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="launch an SGLang worker for dualgate's sglang engine; "
                                            "unknown options go to sglang.launch_server unchanged")
    p.add_argument("--model-path", required=True, help="a local model folder or a hub id already cached")
    p.add_argument("--host", default=os.environ.get("DUALGATE_SGLANG_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("DUALGATE_SGLANG_PORT", "30000")))
    p.add_argument("--served-model-name", default="")
    p.add_argument("--context-length", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    p.add_argument("--mem-fraction-static", type=float, default=0.0)
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    cmd = command(args, extra)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if importlib.util.find_spec("sglang") is None:
        print("sglang is not installed: pip install '.[gpu]' on a machine with a GPU", file=sys.stderr)
        return 2
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
