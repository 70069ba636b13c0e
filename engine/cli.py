"""`tandem make-model` and `tandem generate`: the engine on its own, no cluster."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    make = subparsers.add_parser("make-model", help="build the embedded default model (about a minute)")
    make.add_argument("--out", help="directory to write (default: the user cache, see docs/default-model.md)")
    make.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(run=_make_model)

    gen = subparsers.add_parser("generate", help="generate text with the engine, no cluster")
    gen.add_argument("prompts", nargs="*", default=["Once upon a time,"], help="prompt strings")
    gen.add_argument("--model", help="Hugging Face checkpoint directory (default: the embedded model)")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", default="auto", help="float32 | float16 | bfloat16 | auto")
    gen.add_argument("--device", default="auto", help="cpu | cuda | auto")
    gen.set_defaults(run=_generate)


def _make_model(args: argparse.Namespace) -> int:
    from engine.default_model import default_model_dir, make_default_model

    make_default_model(args.out or default_model_dir(), steps=args.steps, seed=args.seed)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from engine.default_model import ensure_default_model

    model_dir = args.model or ensure_default_model()
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens
    )
    llm = LLM(model_dir, dtype=args.dtype, device=args.device)
    start = time.monotonic()
    outputs = llm.generate(args.prompts, params)
    elapsed = time.monotonic() - start
    for prompt, out in zip(args.prompts, outputs, strict=True):
        print(f"\n>>> {prompt}{out.text}\n    [{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    num_tokens = sum(len(o.token_ids) for o in outputs)
    print(
        f"\n{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.0f} tokens/s) on "
        f"{llm.engine.device}, {llm.engine.dtype}; model {model_dir}"
    )
    return 0
