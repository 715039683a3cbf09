"""Command line: ``fedpeft-hpc {train,inspect,pretrain,quickstart,bench} ...`` (same as ``python -m fedpeft_hpc``).

Bad input ends with a one-line message naming the key or file, exit status 2, and no
traceback. Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

log = logging.getLogger("fedpeft_hpc")

EXIT_USER_ERROR = 2


def setup_logging(level: str = "info", is_main: bool = True) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if is_main else logging.WARNING)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. fed.rounds=5 peft.method=lora optim.lr=1e-3")


def cmd_train(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if summary is not None:
        print(json.dumps(summary))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.inspect import inspect_config

    cfg = load_config(args.config, args.overrides)
    print(inspect_config(cfg, all_methods=args.all, as_json=args.json))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.errors import ConfigError
    from fedpeft_hpc.models.pretrain import ensure_pretrained

    cfg = load_config(args.config, args.overrides)
    if cfg.model.pretrain_recipe is None or not cfg.model.pretrained:
        raise ConfigError("model.pretrain_recipe", "set model.pretrain_recipe (digits) and model.pretrained=true")
    setup_logging(cfg.run.log_level)
    path = ensure_pretrained(cfg.model, force=args.force)
    print(path)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from fedpeft_hpc.quickstart import run_quickstart

    return run_quickstart(out=args.out, methods=args.methods, overrides=args.overrides, config=args.config)


def cmd_bench(args: argparse.Namespace) -> int:
    from fedpeft_hpc.bench.run import run_bench

    setup_logging("warning")
    flags = [f"--suite {args.suite}", f"--device {args.device}"] + (["--json"] if args.json else []) \
        + (["--profile"] if args.profile else []) + ([f"--only {args.only}"] if args.only else []) \
        + ([f"--threads {args.threads}"] if args.threads else [])
    return run_bench(suite=args.suite, device=args.device, as_json=args.json,
                     markdown=None if args.no_markdown else args.markdown, profile_ops=args.profile,
                     only=[m for m in args.only.split(",") if m] if args.only else None, threads=args.threads,
                     command="fedpeft-hpc bench " + " ".join(flags))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft-hpc",
        description="Federated parameter-efficient fine-tuning of pre-trained vision transformers. "
                    "Run `fedpeft-hpc COMMAND --help` for each command.")
    from fedpeft_hpc import __version__

    parser.add_argument("--version", action="version", version=f"fedpeft-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run one federated training (single process, torchrun, mpiexec or srun)",
                       description="Run one federated training. The same command works as one process and "
                                   "under torchrun, mpiexec or srun; results do not depend on the number of "
                                   "processes. Writes run.dir/{config.yaml,metrics.jsonl,summary.json,"
                                   "checkpoints/}.")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="count total/trainable parameters and bytes per transfer (no data, "
                                       "no weights)")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="also tabulate every registered PEFT method")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pretrain", help="build model.checkpoint with the config's model.pretrain_recipe")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if model.checkpoint exists")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("quickstart", help="pre-train a small ViT offline, run every PEFT method federated on "
                                          "digits, print the accuracy/bytes table",
                       description="Runs configs/quickstart.yaml (embedded in the package) once per PEFT "
                                   "method with that method's learning rate, in one process on CPU, and "
                                   "prints method, final/best accuracy, trainable parameters and MB sent.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every method's run")
    p.add_argument("--out", default="runs/quickstart", help="directory for the runs (default: runs/quickstart)")
    p.add_argument("--methods", default="full,head,bias,adapter,prompt,lora",
                   help="comma-separated PEFT methods (default: all six)")
    p.add_argument("--config", default=None, help="use this config instead of the embedded quickstart")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("bench", help="measure this machine: batched vs sequential clients, the batching bound, FL "
                                     "efficiency, aggregation share, memory per client, 2 ranks vs 1",
                       description="Every figure is a ratio of two measurements taken in this run on this machine "
                                   "(e.g. batched over sequential client training, or a federated round over "
                                   "centralized training at the same total batch). Prints a table and appends it "
                                   "to BENCHMARKS.md; --json prints one JSON object with batched_speedup, "
                                   "batching_bound, fl_efficiency, aggregation_share, memory_per_client_ratio and "
                                   "two_rank_speedup. The quick CPU suite takes a few minutes on 2 cores.")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: small model, headline sizes; full: larger model, every method at 8/32/128 clients")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: ViT-B/16 at 224 px, bf16, client batch 16, 32 clients per rank")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--markdown", default="BENCHMARKS.md", metavar="PATH",
                   help="append the rows to this Markdown table (default: BENCHMARKS.md)")
    p.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators of the batched step and of centralized training")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads of the in-process measurements (default 0: the cores not busy with other "
                        "work, i.e. cores minus the 1-minute load average, at least 1)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated measurements to run (clients, rounds, memory, ranks)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedpeft_hpc.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    if not logging.getLogger().handlers:
        setup_logging()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"fedpeft-hpc: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedpeft-hpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fedpeft-hpc inspect ... | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
