"""The ``red-ppo`` command: ``train``, ``diagnose``, ``demo``, ``study``, ``plot`` and ``config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from red_ppo.config import ConfigError, default_config_path, describe, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="red-ppo", description="PPO with RED token rewards (red-kernels).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one PPO run from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see `red-ppo config`)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set reward.mode=sparse (repeatable; the value is YAML)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir")

    diagnose = commands.add_parser("diagnose", help="will RED help with this reward model? (no ground truth needed)")
    diagnose.add_argument("--config", required=True, help="YAML file, the same as `red-ppo train` reads")
    diagnose.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override one key, e.g. --set run.device=cpu (repeatable; the value is YAML)")
    diagnose.add_argument("--prefixes", type=int, default=160,
                          help="prefixes measured, one per response (160, as the verdict's validation)")
    diagnose.add_argument("--continuations", type=int, default=32,
                          help="policy continuations per prefix for the Monte-Carlo values (32, as the validation)")
    diagnose.add_argument("--output", default=None, help="folder for diagnose.json and diagnose.html "
                                                         "(default: run.output_dir/diagnose)")

    demo = commands.add_parser("demo", help="RED against sparse rewards on the synthetic language (make demo)")
    demo.add_argument("--config", default=None, help=f"YAML file (default: {default_config_path()})")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override one key, e.g. --set demo.seeds=[0,1,2,3]")
    demo.add_argument("--run-dir", default=None, help="run folder (default: run.output_dir, runs/demo)")

    study = commands.add_parser("study", help="does RED help? learned, systematic and noisy reward sources at "
                                              "matched accuracy, one scale, 10 paired seeds (about an hour)")
    study.add_argument("--config", default=None, help=f"YAML file (default: {default_config_path()})")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set study.seeds=[0,1,2]")
    study.add_argument("--run-dir", default="runs/study", help="run folder (default: runs/study)")
    study.add_argument("--quick", action="store_true",
                       help="the study.quick_* settings (3 seeds, two levels: about a third of the work)")

    plot = commands.add_parser("plot", help="reward curves of one or more run folders")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/reward_curves.png for one run, "
                                                  "reward_curves.png here for several)")
    plot.add_argument("--window", type=int, default=5, help="trailing-mean window in steps")

    config = commands.add_parser("config", help="print every config key with its value and documentation")
    config.add_argument("--config", default=None, help="YAML file to show merged with the defaults")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _quiet_transformers() -> None:
    """Keep the console for the progress bar: no load reports or per-file progress bars."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("train", "diagnose", "demo", "study"):
        _quiet_transformers()
    try:
        if args.command == "train":
            from red_ppo.trainer import NonFiniteLossError, PPOTrainer
            cfg = load_config(args.config, args.overrides)
            try:
                PPOTrainer(cfg).train(resume=args.resume)
            except NonFiniteLossError as error:
                print(f"red-ppo: stopped: {error}", file=sys.stderr)
                return 3
            print(f"wrote {cfg.run.output_dir}")
        elif args.command == "diagnose":
            from red_ppo.diagnose import run_diagnose
            for name, least in (("prefixes", 1), ("continuations", 2)):  # before any model loads
                if getattr(args, name) < least:
                    raise ConfigError(f"--{name}: expected an integer >= {least}, got {getattr(args, name)}")
            run_diagnose(load_config(args.config, args.overrides), args.output, args.prefixes, args.continuations)
        elif args.command == "demo":
            from red_ppo.demo import run_demo
            overrides = list(args.overrides) + ([f"run.output_dir={args.run_dir}"] if args.run_dir else [])
            run_demo(load_config(args.config or default_config_path(), overrides))
        elif args.command == "study":
            from red_ppo.study import run_study
            overrides = list(args.overrides) + [f"run.output_dir={args.run_dir}"]
            run_study(load_config(args.config or default_config_path(), overrides), quick=args.quick)
        elif args.command == "plot":
            from red_ppo.plot import plot_runs
            missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
            if missing:
                raise ConfigError(f"RUN_DIR: expected run folders holding metrics.jsonl, got {missing}")
            out = args.out or (Path(args.runs[0]) / "reward_curves.png" if len(args.runs) == 1 else "reward_curves.png")
            print(f"wrote {plot_runs([Path(r) for r in args.runs], Path(out), args.window)}")
        elif args.command == "config":
            print(describe(load_config(args.config, args.overrides, check=args.config is not None)))
    except ConfigError as error:
        print(f"red-ppo: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
