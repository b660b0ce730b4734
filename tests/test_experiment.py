"""The experiment harness end to end on the tiny test world: a base arm and an EAPO arm, each a real
run (services as processes), resumable, and a report rebuilt from the run directories alone."""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from helpers import running, wait_for

from eapo.cli import main
from eapo.core.config import ExperimentConfig, derive_seed, load_experiment
from eapo.dev.supervise import terminate
from eapo.dev.world.bootstrap import bootstrap, world_digest, world_manifest
from eapo.experiment.harness import check_world, eval_steps, prune_judged, run_experiment
from eapo.experiment.report import RECORD_METRICS, headline_text, spread, step_value, summarize, write_report
from learner.anneal import anneal_state
from proto.weights import published_versions, write_version


def test_eval_steps_always_include_the_start_and_the_last_step():
    assert eval_steps(40, 10) == [0, 10, 20, 30, 40]
    assert eval_steps(7, 5) == [0, 5, 7]


SHIPPED_EXPERIMENTS = [
    "configs/experiment.yaml",
    "configs/ablations.yaml",
    "configs/experiment-partial.yaml",
    "configs/experiment-unseen.yaml",
    "configs/experiment-lookup.yaml",
    "configs/experiment-lookup-copy.yaml",
    "configs/confirm-fixed-rate.yaml",
]


@pytest.mark.parametrize("path", SHIPPED_EXPERIMENTS)
def test_shipped_experiments_resolve_every_arm(path, tmp_path):
    exp = load_experiment(path)
    # their world is the shipped one, as the current code would build it from their config (else a change
    # to the world's format or defaults has orphaned the experiments' records: rebuild and reship it)
    assert exp.world_digest and world_manifest(exp.arm_config(next(iter(exp.arms)), 0).world.dir).get("shipped")
    check_world(exp.model_copy(update={"out": tmp_path}))
    arms = {arm: exp.arm_config(arm, 0) for arm in exp.arms}
    if "consult-prompt-control" in arms:  # the consult prompt alone: nothing shown, nothing charged
        control = arms["consult-prompt-control"]
        for step in (0, 150, 400):
            state = anneal_state(control.anneal, step)
            assert state.acceptance == 0.0 and state.penalty == 0.0
        assert control.rollout.consult and control.anneal.budget == arms["eapo"].anneal.budget
        assert arms["eapo-high-error-experts"].gateway.degrade["expert"].mode == "high_error"
        assert arms["eapo-content-free-experts"].gateway.degrade["expert"].mode == "content_free"
        slow, fast = (anneal_state(arms[a].anneal, 150).acceptance for a in ("eapo-slow-decay", "eapo-fast-decay"))
        assert fast == 0.0 < anneal_state(arms["eapo"].anneal, 150).acceptance < slow


def test_the_fixed_rate_confirmation_reruns_the_ablations_arms_unchanged():
    # a copy of configs/ablations.yaml's run section and two arms, on other seeds: a drift would make the
    # confirmation test another experiment than the one it confirms
    confirm, ablations = load_experiment("configs/confirm-fixed-rate.yaml"), load_experiment("configs/ablations.yaml")
    assert confirm.run == ablations.run and not set(confirm.seeds) & set(ablations.seeds)
    assert confirm.arms["eapo-fixed-rate"] == ablations.arms["eapo-fixed-rate"]
    assert confirm.arms["self-exploratory-rl"] == load_experiment("configs/experiment.yaml").arms["self-exploratory-rl"]


@pytest.mark.parametrize(("keep", "left"), [("final", [7]), ("judged", [0, 4, 7])])
def test_a_judged_run_keeps_its_final_weights_or_every_judged_version(keep, left, tmp_path):
    for v in range(8):
        write_version(tmp_path, v, v, lambda path: (path / "model.safetensors").write_bytes(b"weights"))
    prune_judged(tmp_path, eval_steps(7, 4), keep)
    assert published_versions(tmp_path) == left


def test_arm_overrides_merge_into_the_shared_run_without_touching_it(tmp_path):
    exp = ExperimentConfig(
        out=tmp_path,
        run={"learner": {"steps": 9, "lr": 1e-3}, "anneal": {"acceptance": {"kind": "linear", "start": 1, "end": 0}}},
        arms={
            "a": {"overrides": {"learner": {"steps": 3}, "anneal": {"acceptance": {"end": 0.5}}}},
            "b": {"train": False},
        },
    )
    a, b = exp.arm_config("a", 2), exp.arm_config("b", 2)
    assert (a.learner.steps, a.learner.lr, a.anneal.acceptance.end) == (3, 1e-3, 0.5)
    assert (b.learner.steps, b.anneal.acceptance.end) == (9, 0.0)
    assert (a.seed, a.rollout.seed, a.learner.seed) == (2, derive_seed(2, "rollout"), derive_seed(2, "learner"))
    assert a.run_dir == tmp_path / "a" / "seed-2"


def test_a_typo_in_any_arm_fails_before_anything_runs(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"arms": {"ok": {}, "bad": {"overrides": {"learner": {"stepz": 3}}}}}))
    with pytest.raises(ValueError, match="stepz"):
        load_experiment(path)


def test_an_arm_named_records_or_with_its_own_world_is_refused():
    with pytest.raises(ValueError, match="may not be named `records`"):
        ExperimentConfig(arms={"records": {}})
    with pytest.raises(ValueError, match=r"arm\(s\) b override `world`"):
        ExperimentConfig(arms={"a": {}, "b": {"overrides": {"world": {"seed": 7}}}})


def test_unknown_arms_are_refused_before_anything_runs(tmp_path, capsys):
    exp = ExperimentConfig(out=tmp_path / "out", seeds=[0, 1], arms={"a": {}, "b": {"train": False}})
    assert exp.runs(["b"]) == [("b", 0), ("b", 1)] and len(exp.runs()) == 4
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    assert main(["experiment", "--config", str(path), "--arms", "b", "c"]) == 2
    assert "unknown arm(s) c; the experiment has a, b" in capsys.readouterr().err
    assert main(["experiment", "--config", str(path), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_spread_of_one_seed_has_no_std():
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


@pytest.mark.e2e
def test_experiment_runs_resumes_and_reports_from_run_directories(tiny_world, tmp_path, capfd):
    exp = ExperimentConfig(
        out=tmp_path / "exp",
        seeds=[0],
        eval_samples=2,
        final_eval_samples=3,  # the final version (and an untrained arm's only one) with more samples
        eval_every=2,
        eval_limit=8,
        run={
            "world": tiny_world.model_dump(mode="json"),
            "expert_server": {"pool": ["expert"]},  # one expert server: a process less to start
            "learner": {"steps": 3, "batch_groups": 1, "max_dropped_per_step": 4, "dynamic_sampling": False},
            "rollout": {"group_size": 2, "max_groups_in_flight": 2, "max_new_tokens": 16, "max_context": 160},
            # the test world's policy never solves a problem: its zero-signal groups are kept
            "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
        },
        arms={"base": {"train": False}, "eapo": {}},
        compare=("eapo", "base"),
    )
    run_experiment(exp, jobs=2)  # both arms at once, each in its own process (capfd: it prints)
    assert "2/2: eapo, seed 0" in capfd.readouterr().out
    eapo = json.loads((exp.out / "eapo" / "seed-0" / "result.json").read_text())
    assert [c["step"] for c in eapo["curve"]] == [0, 2, 3]
    assert sorted(p.name for p in (exp.out / "eapo" / "seed-0" / "eval").iterdir()) == [
        "step-000000.json",
        "step-000002.json",
        "step-000003.json",
    ]
    assert [p.name for p in (exp.out / "eapo" / "seed-0" / "weights").glob("v*")] == ["v000003"]
    assert [c["samples"] for c in eapo["curve"]] == [2, 2, 3]
    base = json.loads((exp.out / "base" / "seed-0" / "result.json").read_text())
    assert [c["samples"] for c in base["curve"]] == [3]

    def scores(arm: str) -> dict[str, list[float]]:
        return json.loads((exp.out / arm / "seed-0" / "eval" / "step-000000.json").read_text())["scores"]

    # step 0 of a trained arm is the untouched SFT policy, judged with the same seeded draws as the base arm,
    # whose third sample per problem extends them
    assert len(scores("base")) == 8 and all(len(v) == 3 for v in scores("base").values())
    assert scores("eapo") == {p: v[:2] for p, v in scores("base").items()}

    # resumable: a finished arm x seed is skipped, an interrupted one starts over with its remains set aside
    (exp.out / "base" / "seed-0" / "result.json").unlink()
    first = (exp.out / "eapo" / "seed-0" / "result.json").stat().st_mtime_ns
    run_experiment(exp)
    assert (exp.out / "eapo" / "seed-0" / "result.json").stat().st_mtime_ns == first
    assert (
        list((exp.out / "base").glob("seed-0.interrupted-*")) and (exp.out / "base" / "seed-0" / "result.json").exists()
    )
    assert "eapo seed 0: held-out mean score" in capfd.readouterr().out
    # piecewise: only the named arms run
    (exp.out / "eapo" / "seed-0" / "result.json").rename(exp.out / "eapo-result.json")
    run_experiment(exp, ["base"])
    out = capfd.readouterr().out
    assert "1/1: base, seed 0" in out and "eapo, seed" not in out
    assert not (exp.out / "eapo" / "seed-0" / "result.json").exists()
    (exp.out / "eapo-result.json").rename(exp.out / "eapo" / "seed-0" / "result.json")

    summary = write_report(exp.out)
    report = (exp.out / "report.md").read_text()
    assert "**eapo − base**" in report and "| base | alone | 0 | 3 |" in report
    assert "2 samples per problem along the curve and 3 for the final version" in report
    for image in ("heldout_vs_step.png", "heldout_vs_time.png", "training.png", "paradigms.png"):
        assert (exp.out / image).stat().st_size > 1000 and f"]({image})" in report
    gap = summary["headline"]["gap"]["mean"]
    rerun_base = json.loads((exp.out / "base" / "seed-0" / "result.json").read_text())
    assert gap == pytest.approx(eapo["curve"][-1]["mean_score"] - rerun_base["curve"][-1]["mean_score"])
    assert json.loads((exp.out / "report.json").read_text())["headline"]["gap"]["mean"] == pytest.approx(gap)

    # the records the report wrote stand in for run directories that are gone (another machine's runs)
    shutil.rmtree(exp.out / "eapo" / "seed-0")
    run_experiment(exp, ["eapo"])
    assert "eapo seed 0: held-out mean score" in capfd.readouterr().out
    assert not (exp.out / "eapo" / "seed-0").exists()  # skipped: nothing ran
    assert write_report(exp.out)["headline"]["gap"]["mean"] == pytest.approx(gap)
    # runs made on another world are refused before anything runs
    shutil.rmtree(exp.out / "base" / "seed-0")
    for path in (exp.out / "records").glob("*/seed-*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "world": "0" * 16}))
    with pytest.raises(SystemExit, match=r"were made on world 0{16}, this machine's is [0-9a-f]{16}"):
        run_experiment(exp, ["base"])
    assert not (exp.out / "base" / "seed-0").exists()


def test_headline_targets_by_hand():
    def run(arm, seed, score, variance, calls, acceptance):
        metrics = [
            {"step": i + 1, "calls_per_episode": c, "acceptance": p}
            for i, (c, p) in enumerate(zip(calls, acceptance, strict=True))
        ]
        curve = [{"step": 10, "mean_score": score, "variance": variance, "per_tier": {}, "expert_calls_per_episode": 0}]
        return {"arm": arm, "seed": seed, "train": True, "eval_mode": "alone", "steps": 10, "curve": curve,
                "seconds": 1.0, "metrics": metrics}  # fmt: skip

    # 10 steps: p 1.0 for 6 steps, then 0; calls 1.0 for the first 5 steps, 0.8 at steps 6, then 0.1
    acceptance = [1.0] * 6 + [0.0] * 4
    calls = [1.0] * 5 + [0.8] + [0.1] * 4
    runs = {
        "eapo": [run("eapo", s, score, 0.1, calls, acceptance) for s, score in ((0, 0.40), (1, 0.36))],
        "rl": [run("rl", s, score, 0.2, [0.0] * 10, [0.0] * 10) for s, score in ((0, 0.30), (1, 0.32))],
    }
    h = summarize(runs, ("eapo", "rl"), 4)["headline"]
    # gaps 0.10 and 0.04: mean 0.07, sample std 0.0424 → every seed positive, mean above the std
    assert h["gap"]["mean"] == pytest.approx(0.07) and h["gap"]["std"] == pytest.approx(0.0424264, abs=1e-6)
    # early = first 2 steps: 1.0; late high-p = the last of the 6 p ≥ 0.5 steps: 0.8 ≥ 0.5; end = last 2: 0.1
    assert h["calls_phases"] == {
        "early": 1.0,
        "late_high_p": 0.8,
        "end": 0.1,
        "holds_while_p_high": True,
        "falls": True,
    }
    assert h["targets"] == {
        "gap_positive_every_seed": True,
        "gap_mean_exceeds_seed_std": True,
        "variance_not_higher": True,
        "calls_hold_then_fall": True,
    }
    # a collapse while p is high (calls 0.3 at step 6, under half of the early 1.0) fails the phases target
    collapsed = [1.0] * 5 + [0.3] + [0.1] * 4
    runs["eapo"] = [run("eapo", s, score, 0.3, collapsed, acceptance) for s, score in ((0, 0.40), (1, 0.29))]
    h = summarize(runs, ("eapo", "rl"), 4)["headline"]
    assert h["targets"] == {
        "gap_positive_every_seed": False,  # seed 1: 0.29 − 0.32
        "gap_mean_exceeds_seed_std": False,  # gaps 0.10, −0.03: mean 0.035 < std 0.0919
        "variance_not_higher": False,
        "calls_hold_then_fall": False,
    }
    # an arm never trained at p ≥ 0.5 (a fixed rate of 0.376) has no high-p phase to judge: None, not NaN
    runs["eapo"] = [run("eapo", s, score, 0.3, calls, [0.376] * 10) for s, score in ((0, 0.40), (1, 0.29))]
    report = summarize(runs, ("eapo", "rl"), 4)
    phases = report["headline"]["calls_phases"]
    assert phases["late_high_p"] is None and phases["holds_while_p_high"] is None
    assert report["headline"]["targets"]["calls_hold_then_fall"] is None
    assert "NaN" not in json.dumps(report)
    assert "no step at p ≥ 0.5" in headline_text(report) and "holds while p is high: n/a" in headline_text(report)


def test_paired_gaps_against_every_arm_and_the_curve_low_by_hand():
    def run(arm, seed, scores):
        curve = [{"step": 50 * i, "mean_score": s, "variance": 0.0, "per_tier": {}, "expert_calls_per_episode": 0}
                 for i, s in enumerate(scores)]  # fmt: skip
        return {"arm": arm, "seed": seed, "train": True, "eval_mode": "alone", "steps": 100, "curve": curve,
                "seconds": 1.0, "metrics": []}  # fmt: skip

    runs = {
        "eapo": [run("eapo", 0, [0.20, 0.10, 0.30]), run("eapo", 1, [0.20, 0.14, 0.26])],
        "control": [run("control", 0, [0.20, 0.18, 0.25]), run("control", 1, [0.20, 0.20, 0.21])],
        "other-seed": [run("other-seed", 5, [0.2, 0.2, 0.2])],  # no seed in common: no gap
    }
    s = summarize(runs, ("eapo", "rl"), 4)
    # gaps +0.05 (seed 0) and +0.05 (seed 1): mean 0.05, std 0
    assert set(s["against"]) == {"control"}
    assert s["against"]["control"]["mean"] == pytest.approx(0.05) and s["against"]["control"]["std"] == pytest.approx(0)
    # eapo's seed-mean curve 0.20, 0.12, 0.28: lowest 0.12 at step 50, 0.08 below the start
    assert s["arms"]["eapo"]["lowest"] == pytest.approx({"step": 50, "mean_score": 0.12, "below_start": 0.08})
    # control's 0.20, 0.19, 0.23: 0.19 at step 50, 0.01 below the start
    assert s["arms"]["control"]["lowest"] == pytest.approx({"step": 50, "mean_score": 0.19, "below_start": 0.01})
    # a seed judged at fewer steps (an interrupted curve): only the points every seed has, 0.20 and 0.12
    runs["eapo"][1]["curve"] = runs["eapo"][1]["curve"][:2]
    low = summarize(runs, ("eapo", "rl"), 4)["arms"]["eapo"]["lowest"]
    assert low == pytest.approx({"step": 50, "mean_score": 0.12, "below_start": 0.08})


def test_records_rebuild_the_report_without_run_directories_and_never_mix_worlds(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    experiment = {"seeds": [0], "eval_samples": 4, "arms": {"eapo": {}, "rl": {}}, "compare": ["eapo", "rl"]}
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment))

    def run_dir(arm, seed, score, world):
        d = out / arm / f"seed-{seed}"
        d.mkdir(parents=True)
        curve = [{"step": 2, "mean_score": score, "variance": 0.1, "per_tier": {"1": score},
                  "expert_calls_per_episode": 0.0}]  # fmt: skip
        result = {"arm": arm, "seed": seed, "world": world, "train": True, "eval_mode": "alone", "steps": 2,
                  "curve": curve, "seconds": 9.0}  # fmt: skip
        (d / "result.json").write_text(json.dumps(result))
        metrics = [{k: 0.5 for k in RECORD_METRICS} | {"step": i, "time_s": 3.0 * i, "loss": 1.0} for i in (1, 2)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))

    run_dir("eapo", 0, 0.30, "w1")
    run_dir("rl", 0, 0.25, "w1")
    first = write_report(out)
    assert first["headline"]["gap"]["mean"] == pytest.approx(0.05)
    record = json.loads((out / "records" / "eapo" / "seed-0.json").read_text())
    assert record["world"] == "w1" and record["curve"][0]["mean_score"] == 0.30
    assert [m["time_s"] for m in record["metrics"]] == [3.0, 6.0] and "loss" not in record["metrics"][0]

    shutil.rmtree(out / "eapo")
    shutil.rmtree(out / "rl")
    assert write_report(out)["headline"] == first["headline"]
    # a run directory wins over its record: the rerun's score replaces the recorded one
    run_dir("rl", 0, 0.20, "w1")
    assert write_report(out)["headline"]["gap"]["mean"] == pytest.approx(0.10)
    # a run on another world would be paired by seed with these: refused, naming the runs of each world
    run_dir("rl", 1, 0.20, "w2")
    with pytest.raises(SystemExit, match=r"different worlds.*world w2: rl/seed-1"):
        write_report(out)


def test_world_digest_covers_every_file_but_the_manifest(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "model.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / "eval.jsonl").write_text('{"id": "e0"}\n')
    (tmp_path / "world.json").write_text('{"seconds": 1.0}')
    digest = world_digest(tmp_path)
    (tmp_path / "world.json").write_text('{"seconds": 2.0}')  # the build's timing differs between builds
    assert world_digest(tmp_path) == digest
    (tmp_path / "policy" / "model.safetensors").write_bytes(b"\x00\x02")
    assert world_digest(tmp_path) != digest
    (tmp_path / "policy" / "model.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / "eval.jsonl").rename(tmp_path / "train.jsonl")  # same bytes under another name: another world
    assert world_digest(tmp_path) != digest


def test_a_pinned_world_is_checked_never_rebuilt(tiny_world, tmp_path):
    digest = world_digest(tiny_world.dir)
    world = tiny_world.model_dump(mode="json")
    pinned = ExperimentConfig(out=tmp_path / "exp", run={"world": world}, arms={"base": {"train": False}})
    check_world(pinned.model_copy(update={"world_digest": digest}))
    with pytest.raises(SystemExit, match=f"its files make world {digest}, not the shipped 0000000000000000 "):
        check_world(pinned.model_copy(update={"world_digest": "0000000000000000"}))
    # a world config that differs from the shipped world's is refused, and the shipped world is left as it was
    other = pinned.model_copy(update={"world_digest": digest, "run": {"world": {**world, "train_problems": 65}}})
    with pytest.raises(SystemExit, match="no world built from this experiment's world config"):
        check_world(other)
    assert world_digest(tiny_world.dir) == digest
    gone = {"world": {**world, "dir": str(tmp_path / "gone")}}
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'gone'}: no world built")):
        check_world(pinned.model_copy(update={"world_digest": digest, "run": gone}))
    assert not (tmp_path / "gone").exists() and not (tmp_path / "exp").exists()


def test_bootstrap_never_rebuilds_a_shipped_world(tiny_world, tmp_path):
    shipped = tmp_path / "world"
    shutil.copytree(tiny_world.dir, shipped)
    manifest = json.loads((shipped / "world.json").read_text())
    (shipped / "world.json").write_text(json.dumps({**manifest, "shipped": True}))
    digest = world_digest(shipped)
    assert bootstrap(tiny_world.model_copy(update={"dir": shipped})) == shipped  # its own config: reused
    with pytest.raises(SystemExit, match="a shipped world, built from another world config"):
        bootstrap(tiny_world.model_copy(update={"dir": shipped, "train_problems": 65}))
    assert world_digest(shipped) == digest


@pytest.mark.e2e
def test_jobs_stop_at_the_first_failure(tiny_world, tmp_path):
    judged = {"train": False}
    exp = ExperimentConfig(
        out=tmp_path / "exp",
        seeds=[0],
        eval_samples=1,
        eval_limit=4,
        run={"world": tiny_world.model_dump(mode="json")},
        # `broken` fails in its worker (its config is checked there); base-3 and base-4 could only start after
        # base and base-2 both finished, which take a worker's start-up and a judgement each
        arms={"base": judged, "broken": {**judged, "overrides": {"no_such_section": 1}}, "base-2": judged,
              "base-3": judged, "base-4": judged},
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="broken/seed-0 failed"):
        run_experiment(exp, jobs=2)
    assert not multiprocessing.active_children()  # the other worker was stopped, not left running
    assert not (exp.out / "base-3" / "seed-0").exists() and not (exp.out / "base-4" / "seed-0").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_experiment_says_interrupted_not_failed(sig, tiny_world, tmp_path):
    """SIGTERM (as `kill`, or Ctrl-C): the parent stops the worker and its stack, and says so. SIGKILL: the
    parent cannot; the kernel's parent-death signal stops the worker, and no process of the run is left."""
    config = tmp_path / "exp.yaml"
    out = tmp_path / "exp"
    config.write_text(
        yaml.safe_dump(
            {
                "out": str(out),
                "seeds": [0],
                "run": {
                    "world": tiny_world.model_dump(mode="json"),
                    "expert_server": {"pool": ["expert"]},
                    "learner": {"steps": 1000, "batch_groups": 1, "dynamic_sampling": False},
                    "rollout": {"group_size": 2, "max_new_tokens": 16, "max_context": 160},
                },
                "arms": {"eapo": {}},
            }
        )
    )
    command = [sys.executable, "-m", "eapo.cli", "experiment", "--config", str(config), "--jobs", "2"]
    run_dir = out / "eapo" / "seed-0"
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        experiment = subprocess.Popen(command, stdout=stdout, stderr=stderr)
    try:
        metrics = run_dir / "metrics.jsonl"
        stepped = lambda: metrics.exists() and bool(metrics.read_text().strip())  # noqa: E731
        wait_for(lambda: stepped() or experiment.poll() is not None, 240, "a learner step")
        assert stepped(), (tmp_path / "stderr").read_text()
        pids = [json.loads((run_dir / "up.json").read_text())["pid"]]  # the worker
        pids += json.loads((run_dir / "processes.json").read_text()).values()  # its stack
        experiment.send_signal(sig)
        experiment.wait(timeout=240)
        wait_for(lambda: not any(map(running, pids)), 240, "every process of the run to end")
    finally:
        terminate([experiment], 60)  # a failed test leaves nothing training: the parent stops its worker
    err = (tmp_path / "stderr").read_text()
    assert "training failed" not in err and "Traceback" not in err, err
    said = (tmp_path / "stdout").read_text()  # the worker's stack says how to go on: not `eapo up --resume`
    assert "interrupted: stopping every process; rerun the same `eapo experiment` command" in said, said
    assert "eapo up --resume" not in said + err
    assert experiment.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err
    assert sig == signal.SIGKILL or "interrupted" in err, err
    assert not (run_dir / "result.json").exists()


def test_a_step_statistic_is_nan_where_undefined_and_a_misspelled_one_is_an_error():
    step = {"calls_per_episode": 0.0, "accepted_rate": 0.0, "accuracy": 0.25, "accuracy_alone": None}
    assert step_value(step, "accuracy") == 0.25
    assert math.isnan(step_value(step, "accepted_rate"))  # no consults this step
    assert math.isnan(step_value(step, "accuracy_alone"))  # nobody answered alone
    assert math.isnan(step_value(step, "advantage_consulting"))  # a record made before it was kept
    with pytest.raises(KeyError):
        step_value(step, "acuracy")
