"""The ``fastsft`` command line: ``sft``, ``train``, ``merge``, ``bench``, ``check`` and ``demo`` (see ``fastsft
<command> --help``)."""

from __future__ import annotations

import argparse
import logging
import sys

from fastsft import __version__


class UsageError(ValueError):
    """A mistake in the command's input (settings, paths, files): ``main`` prints it as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsft", description="Kernel-first LoRA/QLoRA supervised fine-tuning")
    parser.add_argument("--version", action="version", version=f"fastsft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    # parsed by TRL's own parser (fastsft.commands.sft): every `trl sft` flag and config file
    sft = commands.add_parser("sft", add_help=False, help="`trl sft`'s arguments and config files, trained by fastsft "
                                                          "(fastsft sft --help lists them)")
    sft.add_argument("arguments", nargs=argparse.REMAINDER)
    bench = commands.add_parser("bench", add_help=False, help="the benchmarks: e2e (end to end beside TRL, Liger and "
                                                              "Unsloth), suite, report (from a source checkout)")
    bench.add_argument("arguments", nargs=argparse.REMAINDER)

    train = commands.add_parser("train", help="run the SFT recipe from a YAML config and/or flags")
    train.add_argument("config", nargs="?", help="YAML file of settings (flags override it)")
    train.add_argument("--model", help="model directory or hub id; 'demo': the built-in small model (random init)")
    train.add_argument("--dataset", help="JSON/JSONL dataset file; 'demo': the built-in chat data")
    train.add_argument("--output-dir", dest="output_dir")
    train.add_argument("--max-steps", dest="max_steps", type=int)
    train.add_argument("--learning-rate", dest="learning_rate", type=float)
    train.add_argument("--batch-size", dest="per_device_train_batch_size", type=int)
    train.add_argument("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int)
    train.add_argument("--max-seq-length", dest="max_seq_length", type=int)
    train.add_argument("--dtype")
    train.add_argument("--seed", type=int)
    train.add_argument("--load-in-4bit", dest="load_in_4bit", action="store_true")
    train.add_argument("--no-patch", dest="no_patch", action="store_true", help="train with stock TRL behaviour")
    train.add_argument("--resume-from-checkpoint", dest="resume_from_checkpoint", nargs="?", const=True,
                       metavar="CHECKPOINT", help="continue from this checkpoint (alone: the last one in --output-dir)")

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model, check it, save it in "
                                              "plain transformers format")
    from fastsft.commands.merge import add_arguments

    add_arguments(merge)

    check = commands.add_parser("check", help="run every op against its reference on this machine")
    check.add_argument("--strict", action="store_true", help="also fail for ops that have no check case")

    demo = commands.add_parser("demo", help="train the built-in model patched and unpatched, compare")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    demo.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    demo.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole model")
    demo.add_argument("--output-dir", dest="output_dir", help="keep the runs' outputs here (default: temporary)")
    demo.add_argument("--json", help="write losses, timings and peak memory to this JSON file")
    demo.add_argument("--plot", help="the PNG of losses, speed and memory (default: beside --json, in --output-dir, "
                                     "or fastsft-demo.png here)")
    demo.add_argument("--no-plot", dest="no_plot", action="store_true", help="draw nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["sft"], ["bench"]):  # their own parsers take the rest as it is (--help included)
        args = argparse.Namespace(command=argv[0], arguments=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "sft":
        from fastsft.commands import sft as command
    elif args.command == "bench":
        from fastsft.commands import bench as command
    elif args.command == "merge":
        from fastsft.commands import merge as command
    elif args.command == "check":
        from fastsft.commands import check as command
    elif args.command == "demo":
        from fastsft.commands import demo as command
    else:
        from fastsft.commands import train as command
    try:
        # sft's and bench's arguments go to their own parsers as they are
        return command.main(args.arguments if args.command in ("sft", "bench") else args)
    except UsageError as exc:  # the user's input, not fastsft: no traceback, argparse's exit code
        print(f"fastsft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
