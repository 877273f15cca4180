"""``portaserve generate`` and ``portaserve chat``: the offline API from the command line."""

from __future__ import annotations

import argparse
import sys

from portaserve.serve.engine_args import add_engine_args, engine_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="complete prompts with a model")
    add_engine_args(gen)
    gen.add_argument(
        "--prompt", "-p", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    _add_sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat with a model (interactive without --message)")
    add_engine_args(chat)
    chat.add_argument(
        "--message",
        "-m",
        action="append",
        help="user message (repeat for several turns, answered one by one)",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args: argparse.Namespace):  # -> SamplingParams
    from portaserve.core.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
    )


def _llm(args: argparse.Namespace):
    from portaserve.core.llm import LLM

    return LLM.from_engine_config(engine_config_from_args(args))


def run_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _llm(args)
    for out in llm.generate(args.prompt, params):
        for completion in out.outputs:
            print(completion.text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _llm(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turns = iter(args.message) if args.message else _read_turns()
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = llm.chat(messages, params)[0].outputs[0].text
        print(reply, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _read_turns():
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip():
            yield line
