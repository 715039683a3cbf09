"""Command line: ``fedpeft-hpc {train,inspect,config,pretrain,quickstart,submit,sweep,status,cancel,report,bench} ...``
(same as ``python -m fedpeft_hpc``).

Bad input ends with a one-line message naming the key or file, exit status 2, and no
traceback. Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from fedpeft_hpc.errors import UserError
from fedpeft_hpc.utils.logs import setup_logging

EXIT_USER_ERROR = 2


def _load(args: argparse.Namespace):
    """The config of ``args.config`` + ``args.overrides``, checked against the registries."""
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.preflight import check_names

    return check_names(load_config(args.config, args.overrides))


def _log_for(cfg) -> None:
    """Console logging at ``run.log_level`` on rank 0 (warnings elsewhere), ranks from the launcher."""
    from fedpeft_hpc.comm.world import detect_world

    world = detect_world()
    setup_logging(cfg.run.log_level, world.rank, world.world_size)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USER_ERROR


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. fed.rounds=5 peft.method=lora optim.lr=1e-3")


def cmd_train(args: argparse.Namespace) -> int:
    from fedpeft_hpc.train import train

    cfg = _load(args)
    _log_for(cfg)
    summary = train(cfg)
    if summary is not None:
        print(json.dumps(summary))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedpeft_hpc.counts import counts_report

    print(counts_report(_load(args), all_methods=args.all, as_json=args.json))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config import dump_yaml

    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config.describe import config_keys, keys_markdown, keys_text
    from fedpeft_hpc.preflight import registry_choices

    keys = config_keys(registry_choices())
    print(keys_markdown(keys) if args.markdown else keys_text(keys))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedpeft_hpc.errors import ConfigError
    from fedpeft_hpc.models.pretrain import ensure_pretrained

    cfg = _load(args)
    if cfg.model.pretrain_recipe is None or not cfg.model.pretrained:
        raise ConfigError("model.pretrain_recipe", "set model.pretrain_recipe (digits) and model.pretrained=true")
    setup_logging(cfg.run.log_level)
    path = ensure_pretrained(cfg.model, force=args.force)
    print(path)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from fedpeft_hpc.quickstart import run_quickstart

    return run_quickstart(out=args.out, methods=args.methods, overrides=args.overrides, config=args.config)


def cmd_submit(args: argparse.Namespace) -> int:
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.launchers.profile import load_profile, with_flags
    from fedpeft_hpc.launchers.submit import submit

    cfg = load_config(args.config, args.overrides)
    profile = with_flags(load_profile(args.cluster), vars(args))
    return submit(cfg, profile, executor=args.executor, wait=args.wait, dry_run=args.dry_run)


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedpeft_hpc.launchers.profile import load_profile, with_flags
    from fedpeft_hpc.launchers.sweep import run_sweep
    from fedpeft_hpc.launchers.sweep_spec import load_sweep

    spec = load_sweep(args.sweep)
    profile = with_flags(load_profile(args.cluster), vars(args))
    out = Path(args.out) if args.out else Path("runs") / spec.name
    return run_sweep(spec, out, args.executor, profile, args.max_parallel, dry_run=args.dry_run, wait=args.wait,
                     only=args.only, max_attempts=args.max_attempts)


def cmd_status(args: argparse.Namespace) -> int:
    from fedpeft_hpc.status import status

    print(status(args.dir, as_json=args.json))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from fedpeft_hpc.status import cancel

    return cancel(args.dir)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpeft_hpc.report import write_report

    panels = [k.strip() for k in (args.panels or "").split(",") if k.strip()]
    paths, md = write_report(args.dir, panels, ci=args.ci)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _launch_args(p: argparse.ArgumentParser, wait_help: str, dry_run_help: str) -> None:
    """Executor, resource, --wait and --dry-run flags shared by submit and sweep; resources override
    the --cluster profile."""
    p.add_argument("--executor", default="auto", choices=("auto", "slurm", "local", "debug"),
                   help="slurm: sbatch through submitit; local: subprocesses on this machine; debug: in this "
                        "process (pdb on errors); auto (default): slurm where srun exists, else local")
    p.add_argument("--cluster", metavar="PROFILE.yaml",
                   help="cluster profile: partition, account, GPUs, setup lines (see slurm/clusters/example.yaml)")
    g = p.add_argument_group("resources (override the profile)")
    g.add_argument("--nodes", type=_count(1), metavar="N", help="nodes per job")
    g.add_argument("--gpus-per-node", type=_count(0), metavar="G", help="GPUs per node; one task (rank) per GPU")
    g.add_argument("--tasks-per-node", type=_count(1), metavar="T",
                   help="tasks (ranks) per node (default: G, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=_count(1), metavar="C", help="CPU cores per task")
    g.add_argument("--mem-gb", type=_positive_float, metavar="M", help="memory per node, GB")
    g.add_argument("--time", type=_count(1), metavar="MIN",
                   help="time limit in minutes (default: 60 on SLURM, 7 days locally); near it the job "
                        "requeues itself and resumes")
    g.add_argument("--partition", metavar="P")
    g.add_argument("--account", metavar="A")
    g.add_argument("--qos", metavar="Q")
    p.add_argument("--wait", action="store_true", help=wait_help)
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)


def cmd_bench(args: argparse.Namespace) -> int:
    from fedpeft_hpc.bench.context import KNOBS
    from fedpeft_hpc.bench.run import run_bench

    setup_logging("warning")
    flags = [f"--suite {args.suite}", f"--device {args.device}"] + (["--json"] if args.json else []) \
        + (["--profile"] if args.profile else []) + ([f"--only {args.only}"] if args.only else []) \
        + ([f"--threads {args.threads}"] if args.threads else [])
    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    flags += [f"--{k.replace('_', '-')} {v}" for k, v in knobs.items()]
    return run_bench(suite=args.suite, device=args.device, as_json=args.json,
                     markdown=None if args.no_markdown else args.markdown,
                     out=None if args.no_markdown else args.out, profile_ops=args.profile,
                     only=[m for m in args.only.split(",") if m] if args.only else None, threads=args.threads,
                     command="fedpeft-hpc bench " + " ".join(flags), knobs=knobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft-hpc",
        description="Federated parameter-efficient fine-tuning of pre-trained vision transformers. "
                    "Run `fedpeft-hpc COMMAND --help` for each command.")
    from fedpeft_hpc import __version__

    parser.add_argument("--version", action="version", version=f"fedpeft-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_run_commands(sub)
    _add_cluster_commands(sub)
    _add_bench_command(sub)
    return parser


def _add_run_commands(sub) -> None:
    """train, inspect, config, pretrain, quickstart: one config, this machine."""
    p = sub.add_parser("train", help="run one federated training (single process, torchrun, mpiexec or srun)",
                       description="Run one federated training. The same command works as one process and "
                                   "under torchrun, mpiexec or srun; results do not depend on the number of "
                                   "processes. Writes run.dir/{config.yaml,metrics.jsonl,summary.json,"
                                   "checkpoints/}. A run.dir that holds a run is continued from its checkpoint, "
                                   "also to a larger fed.rounds (not under DP); one leased by another live job "
                                   "or process (lease.json) is refused.")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="count total/trainable parameters and bytes per transfer (no data, "
                                       "no weights); with peft.local / peft.frozen / peft.lora_ranks also the "
                                       "sent, local and frozen parameters and the bytes per LoRA rank; the "
                                       "bytes per transfer under each encoding (fed.compress_up/down)")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="also tabulate every registered PEFT method")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("config", help="print the resolved config, or every config key with its help",
                       description="`config show CONFIG [key=value ...]` prints the resolved config as YAML "
                                   "(base: files merged, overrides applied, every value typed and checked) "
                                   "without running anything; `config keys` lists every dotted key with "
                                   "its type, default, allowed values and help.")
    p.set_defaults(func=lambda _args, parser=p: _usage(parser))
    csub = p.add_subparsers(dest="config_command", metavar="{show,keys}")
    c = csub.add_parser("show", help="print the resolved config as YAML")
    _config_args(c)
    c.set_defaults(func=cmd_config_show)
    c = csub.add_parser("keys", help="list every dotted key: type, default, allowed values, help")
    c.add_argument("--markdown", action="store_true", help="as a markdown table (the README's)")
    c.set_defaults(func=cmd_config_keys)

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


def _add_cluster_commands(sub) -> None:
    """submit, sweep, report: jobs on SLURM (or locally) and what they produced."""
    p = sub.add_parser("submit", help="submit one training through submitit (SLURM, or the local executor)",
                       description="Check the config fully (model, weights, data, partition, privacy, run.dir), "
                                   "then submit it as one checkpointable submitit job: every task is one rank; "
                                   "near its time limit or on preemption the job requeues itself and resumes "
                                   "from checkpoints/latest.safetensors. Logs go to run.dir/slurm/. Prints the "
                                   "job id, the log paths and the run directory.")
    _config_args(p)
    _launch_args(p, wait_help="follow the job (through requeues); exit 0 once the run wrote summary.json, else 1",
                 dry_run_help="print the sbatch script (or local parameters) and the command; submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("sweep", help="expand a sweep file (grid x zip x seeds) and run what is not done yet",
                       description="Expand SWEEP.yaml (base, grid, zip, overrides, seeds) into named runs under "
                                   "DIR, check every run's config before anything runs (a bad value exits 2 "
                                   "naming the run and the key), write DIR/sweep.json, and run the runs that are "
                                   "new, interrupted (resumed) or failed: on SLURM as one job array, locally at "
                                   "most --max-parallel at a time. Finished, queued and running runs are "
                                   "skipped; runs are known by what they compute (config, weights, data), not "
                                   "by their names.")
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/NAME, NAME from the sweep file)")
    p.add_argument("--max-parallel", type=_count(1), metavar="N",
                   help="runs at once: the SLURM array's concurrency limit (default: submitit's 256), or local "
                        "subprocesses (default 1)")
    p.add_argument("--only", metavar="STATE|GLOB",
                   help="start only the runs in this state (new, interrupted, failed) or whose name matches this "
                        "glob, e.g. 'method=lora_*'")
    p.add_argument("--max-attempts", type=_count(1), metavar="N",
                   help="never submit a run more than N times in all (sweep.json counts the submissions)")
    _launch_args(p, wait_help="SLURM: follow the array until every run ended (one squeue every 30 s or more; the "
                              "run directories in between); local and debug always wait",
                 dry_run_help="list every run with its state and what would be submitted; run nothing, "
                              "write nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="state, rounds, last accuracy, job, elapsed time and log of every run in a "
                                      "sweep, run or folder of runs",
                       description="Per run: queued, running, finished, failed, interrupted or new; rounds done of "
                                   "planned; the last test accuracy; the job id; the time used (the scheduler's, "
                                   "while the job is queued or running); the log. One squeue for all jobs (and "
                                   "sacct where accounting exists); builds no model and no data.")
    p.add_argument("dir", help="sweep directory (sweep.json), run directory, or folder of run directories")
    p.add_argument("--json", action="store_true", help="one JSON object: title and one entry per run")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel what a sweep, run or folder of runs has queued or running",
                       description="One scancel for every queued or running SLURM job of the runs under DIR (local "
                                   "submitit jobs through submitit). The runs keep their checkpoints: the next "
                                   "sweep or submit resumes them.")
    p.add_argument("dir", help="sweep directory (sweep.json), run directory, or folder of run directories")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("report", help="tables and plots of the runs in a sweep (or run) directory",
                       description="Write DIR/results.csv (one row per run), DIR/results.md and DIR/results.tex "
                                   "(one row per setting: one config, rounds included, weights and data; mean ± std "
                                   "over seeds, n), DIR/accuracy_vs_round.png and DIR/accuracy_vs_bytes.png (Pareto "
                                   "front marked). DIR: a sweep directory, one run directory, or a "
                                   "folder of run directories. Unfinished runs are listed as such.")
    p.add_argument("dir", help="sweep directory (sweep.json), run directory, or folder of run directories")
    p.add_argument("--ci", action="store_true",
                   help="mean ± half-width of the 95%% Student-t interval over seeds instead of ± standard deviation")
    p.add_argument("--panels", metavar="KEY[,KEY]",
                   help="plots: one panel per combination of these swept keys' values (e.g. "
                        "data.partition,privacy.mode; short names work too); the lines of a panel are the "
                        "other settings")
    p.set_defaults(func=cmd_report)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="measure this machine: batched vs sequential clients, the batching bound, FL "
                                     "efficiency, aggregation share, memory per client, 2 ranks vs 1",
                       description="Every figure is a ratio of two measurements taken in this run on this machine "
                                   "(e.g. batched over sequential client training, or a federated round over "
                                   "centralized training at the same total batch). Prints a table and appends it "
                                   "to DIR/bench.md (--out; BENCHMARKS.md only with --markdown); --json prints one "
                                   "JSON object with batched_speedup, "
                                   "batching_bound, fl_efficiency, aggregation_share, memory_per_client_ratio, "
                                   "two_rank_speedup, ops_per_step and host_syncs_per_step. --method, --clients, "
                                   "--batch-size, --precision, --model and --steps narrow the suite's profile. The "
                                   "quick CPU suite takes a few minutes on 2 cores.")
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: small model, headline sizes; full: larger model, every method at 8/32/128 clients")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: ViT-B/16 at 224 px, bf16, client batch 16, 32 clients per rank")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    p.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="append the rows to DIR/bench.md, a Markdown table (default: runs/bench)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also append them to this Markdown table, e.g. the repository's BENCHMARKS.md")
    p.add_argument("--no-markdown", action="store_true", help="write no file (--out and --markdown)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators of the batched step and of centralized training")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads of the in-process measurements (default 0: the cores not busy with other "
                        "work, i.e. cores minus the 1-minute load average, at least 1)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated measurements to run (clients, rounds, memory, ranks, data; "
                        "clients_dp in the full suite)")
    p.add_argument("--method", default=None, help="the one PEFT method measured (and of the JSON keys; default: "
                                                   "bias for the keys, every method in the table)")
    p.add_argument("--clients", type=int, default=None, metavar="K", help="clients per rank (default: the suite's)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="client batch (default: the suite's)")
    p.add_argument("--precision", default=None, help="model.precision: fp32, tf32 or bf16 (default: fp32 on CPU, "
                                                      "bf16 on CUDA)")
    p.add_argument("--model", default=None, help="quickstart, vit_tiny (32 px) or vit_base (ViT-B/16, 224 px) "
                                                  "(default: the suite's)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="local steps per client in the client "
                                                                         "measurements (default: the suite's)")
    p.set_defaults(func=cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
