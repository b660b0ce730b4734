"""``eapo``: one command, a subcommand per role. Every role reads ``--config FILE.yaml``; any setting
can be overridden by an ``EAPO_…`` environment variable (nested with ``__``, e.g.
``EAPO_LEARNER__STEPS=40``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from eapo.core.config import EAPOConfig, EvalMode, load_config
from eapo.core.logs import setup_logging
from proto.schemas import AnswerKind

log = logging.getLogger("eapo")


def _redis_url(cfg: EAPOConfig) -> str:
    url = cfg.redis.resolved_url()
    if url is None:
        sys.exit("this role needs Redis: set REDIS_URL or redis.url (only `eapo up` starts a private server)")
    return url


def cmd_up(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    from eapo.dev.up import resume_config, run_stack

    if args.resume is not None:
        return run_stack(resume_config(args.resume, args.config), config_path=args.config, resume=True)
    return run_stack(cfg, config_path=args.config)


def cmd_bootstrap(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    from eapo.dev.world.bootstrap import bootstrap

    bootstrap(cfg.world, force=args.force)
    return 0


def cmd_expert_server(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    es = cfg.expert_server
    path = es.model_path or cfg.world.dir / es.model
    if es.engine == "vllm":
        from eapo.inference.vllm_server import exec_server

        exec_server(path, es.model, es.host, es.port, es.vllm_args)  # does not return
    import uvicorn

    from eapo.inference.cpu_server import create_app

    uvicorn.run(
        create_app(es, path),
        host=es.host,
        port=es.port,
        log_level="warning",
        access_log=False,
    )
    return 0


def cmd_gateway(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    import uvicorn

    from eapo.core.gc_tuning import tune_gc
    from expert_gateway.app import create_app

    if not cfg.gateway.backends and not cfg.gateway.discovery:
        sys.exit("the gateway has no backends: configure gateway.backends or gateway.discovery")
    app = create_app(cfg.gateway)
    tune_gc()
    uvicorn.run(
        app,
        host=cfg.gateway.host,
        port=cfg.gateway.port,
        log_level="warning",
        access_log=False,  # no per-request logging on the hot path; /metrics counts requests
        proxy_headers=False,  # client addresses are never used: skip the per-request header rewrite
        timeout_graceful_shutdown=cfg.gateway.shutdown_grace_s,  # SIGTERM: in-flight requests finish
        timeout_keep_alive=cfg.gateway.keep_alive_s,
    )
    return 0


def cmd_rollout(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    import uvloop

    from eapo.core.gc_tuning import tune_gc
    from rollout_service.service import serve

    tune_gc()  # after the imports (torch, transformers), before any model: weight versions stay collectable
    uvloop.run(serve(cfg, _redis_url(cfg)))
    return 0


def cmd_learner(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    from learner.service import run_learner

    run_learner(cfg, _redis_url(cfg))
    return 0


def cmd_eval(cfg: EAPOConfig, args: argparse.Namespace) -> int:
    from dataclasses import replace

    from eapo.core.data import PRESETS
    from rollout_service.evaluate import run_eval

    layout = PRESETS[args.layout]
    if args.answer_kind is not None:
        layout = replace(layout, answer_kind=args.answer_kind)
    if args.answer_pattern is not None:
        layout = replace(layout, answer_pattern=args.answer_pattern)
    report = run_eval(cfg, args.model, args.dataset, layout, args.samples, args.out, args.limit, args.mode)
    s = report["summary"]
    print(
        f"[{args.mode}] {int(s['problems'])} problems x {int(s['samples_per_problem'])} samples: mean score "
        f"{s['mean_score']:.4f}, variance {s['variance']:.4f}, pass@1 {s['pass@1']:.4f}, "
        + (f"F1 {s['mean_f1']:.4f}, " if "mean_f1" in s else "")
        + f"expert calls/episode {report['expert_calls_per_episode']:.2f} -> {args.out}"
    )
    return 0


def cmd_experiment(cfg: EAPOConfig | None, args: argparse.Namespace) -> int:
    from eapo.experiment.harness import run_experiment
    from eapo.experiment.report import table, write_report

    exp = args.experiment  # loaded and checked by main()
    try:
        run_experiment(exp, args.arms, args.jobs)
    except KeyboardInterrupt:
        print(
            "[eapo experiment] interrupted; finished runs keep their results: the same command continues",
            file=sys.stderr,
        )
        return 130
    summary = write_report(exp.out)
    print(table(summary))
    print(f"[eapo experiment] report at {exp.out / 'report.md'}", flush=True)
    return 0


def cmd_report(cfg: EAPOConfig | None, args: argparse.Namespace) -> int:
    from eapo.experiment.report import table, write_report

    summary = write_report(args.dir)
    print(table(summary))
    return 0


# These read their own file, not a run config.
OWN_CONFIG = {"experiment", "report"}

COMMANDS = {
    "up": (
        cmd_up,
        "bring up the whole local stack (Redis, experts, gateway, learner, rollout), train, stop; a process that "
        "dies is restarted with back-off within a restart budget (config section `supervision`)",
    ),
    "bootstrap": (cmd_bootstrap, "build the tiny CPU world: tasks, tokenizer, policy and expert models"),
    "expert-server": (cmd_expert_server, "serve one model with the CPU OpenAI-compatible server"),
    "gateway": (cmd_gateway, "run the expert gateway (FastAPI)"),
    "rollout": (cmd_rollout, "run one rollout replica"),
    "learner": (cmd_learner, "run the DeepSpeed learner (alone, or every rank under torchrun)"),
    "eval": (cmd_eval, "a checkpoint answers a dataset (alone or a baseline workflow): mean@N, variance, pass@k"),
    "experiment": (cmd_experiment, "run an experiment's arms x seeds one after another, then write its report"),
    "report": (cmd_report, "rebuild an experiment's report (Markdown, PNG, JSON) from its run directories"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eapo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "experiment":
            p.add_argument("--config", type=Path, default=Path("configs/experiment.yaml"), help="experiment file")
            p.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (default: all)")
            p.add_argument("--jobs", type=int, default=1, metavar="N", help="arm x seeds at once (default 1)")
        elif name == "report":
            p.add_argument("dir", type=Path, help="the experiment's output directory")
        else:
            p.add_argument("--config", type=Path, default=None, help="YAML config file (default: built-in defaults)")
        if name == "up":
            p.add_argument(
                "--resume",
                type=Path,
                metavar="RUN_DIR",
                help="continue the run in RUN_DIR (stopped, crashed or killed): its stored config (or --config, "
                "which may change only learner.steps, keep_* and supervision), its private Redis replayed from "
                "the append-only file, the learner from its newest checkpoint, the rollout's held prompts re-read",
            )
        if name == "bootstrap":
            p.add_argument("--force", action="store_true", help="rebuild even if the cached world matches")
        if name == "eval":
            p.add_argument("--model", type=Path, help="checkpoint directory (default: model.policy)")
            p.add_argument("--dataset", type=Path, help="JSONL or Parquet file (default: data.eval, in its own layout)")
            p.add_argument(
                "--layout",
                default="world",
                choices=["world", "aime", "aimo", "dapo"],
                help="field layout of --dataset's records",
            )
            p.add_argument(
                "--answer-kind",
                choices=get_args(AnswerKind),
                help="override the layout's: math (math-verify) or short (exact match and F1)",
            )
            p.add_argument("--answer-pattern", help="the task's own answer format: a regex, group 1 is the answer")
            p.add_argument("--samples", type=int, default=4, help="N samples per problem")
            p.add_argument(
                "--mode",
                default="alone",
                choices=get_args(EvalMode),
                help="alone; expert-assisted (experts via rollout.gateway_url, all accepted); "
                "self-collaboration (the policy answers its own queries)",
            )
            p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
            p.add_argument("--out", type=Path, default=Path("eval.json"), help="report file (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        if args.command == "experiment":
            from eapo.core.config import load_experiment

            args.experiment = load_experiment(args.config)  # checked before anything starts
            args.experiment.runs(args.arms)
            if args.jobs < 1:
                raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        elif args.command not in OWN_CONFIG:
            cfg = load_config(args.config)
    except Exception as exc:  # a bad config is the user's to fix: say what is wrong, no traceback
        print(f"eapo {args.command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(os.environ.get("EAPO_ROLE", args.command), cfg.log_level if cfg else "INFO")
    handler, _ = COMMANDS[args.command]
    return handler(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
