import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from eapo.cli import COMMANDS
from eapo.core.config import EAPOConfig, LearnerConfig, derive_seed, load_config


def test_env_overrides_file_and_file_overrides_defaults(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learner": {"steps": 7, "lr": 0.5}, "rollout": {"group_size": 3}}))
    monkeypatch.setenv("EAPO_LEARNER__STEPS", "40")
    cfg = load_config(path)
    assert cfg.learner.steps == 40  # environment (a Kubernetes ConfigMap) wins
    assert cfg.learner.lr == 0.5 and cfg.rollout.group_size == 3
    assert cfg.learner.clip_low == 0.20 and cfg.learner.clip_high == 0.28  # DAPO defaults


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, run_dir=str(tmp_path / "run"))
    cfg.dump_yaml(tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_secrets_never_reach_the_run_directory_but_reach_children(tmp_path, monkeypatch):
    monkeypatch.setenv("EAPO_GATEWAY__API_TOKEN", "s3cret-data")
    cfg = load_config(None, run_dir=str(tmp_path / "run"))
    cfg.dump_yaml(tmp_path / "resolved.yaml")
    assert "s3cret" not in (tmp_path / "resolved.yaml").read_text() and "s3cret" not in repr(cfg)
    assert cfg.secret_env() == {"EAPO_GATEWAY__API_TOKEN": "s3cret-data"}
    for name, value in cfg.secret_env().items():  # what `eapo up` hands its children
        monkeypatch.setenv(name, value)
    assert load_config(tmp_path / "resolved.yaml").gateway.api_token.get_secret_value() == "s3cret-data"


def test_a_redis_password_is_masked_on_disk_and_handed_over_by_environment(tmp_path):
    cfg = load_config(None, redis={"url": "redis://:hunter2@10.0.0.5:6379/0"})
    cfg.dump_yaml(tmp_path / "resolved.yaml")
    text = (tmp_path / "resolved.yaml").read_text()
    assert "hunter2" not in text and "redis://:***@10.0.0.5:6379/0" in text
    assert cfg.secret_env()["REDIS_URL"] == "redis://:hunter2@10.0.0.5:6379/0"


@pytest.mark.parametrize(
    "data,match",
    [
        ({"learner": {"stepz": 3}}, "stepz"),
        ({"rollout": {"max_queries": 9}}, "exceeds gateway.max_queries"),
        ({"anneal": {"acceptance": {"kind": "zigzag", "start": 1, "end": 0}}}, "kind"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=match):
        load_config(path)


def eapo(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; a generous bound, as importing torch and DeepSpeed is slow on a busy machine."""
    return subprocess.run([sys.executable, "-m", "eapo.cli", *argv], capture_output=True, text=True, timeout=300)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner: [1, 2]\n")
    proc = eapo("learner", "--config", str(path))
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_reports_a_bad_experiment_without_a_traceback(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("arms: {eapo: {overrides: {rollout: {group_size: many}}}}\n")
    proc = eapo("experiment", "--config", str(path))
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "group_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_role_has_help(command):
    proc = eapo(command, "--help")
    assert proc.returncode == 0 and ("--config" in proc.stdout or command == "report")


CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "gpu-8b.yaml"])
def test_run_configs_validate(name):
    load_config(CONFIGS / name)


def test_the_gpu_example_has_the_papers_table_5_settings():
    cfg = load_config(CONFIGS / "gpu-8b.yaml")
    lc, rc = cfg.learner, cfg.rollout
    assert (lc.lr, lc.warmup_steps, lc.clip_low, lc.clip_high, lc.batch_groups) == (1e-6, 10, 0.20, 0.28, 32)
    assert (rc.temperature, rc.top_p, rc.max_new_tokens, rc.max_context - rc.max_new_tokens) == (1.0, 1.0, 20480, 2048)
    assert rc.max_groups_in_flight == 96 and rc.group_size > 1 and rc.engine == "vllm"
    assert cfg.policy_path == cfg.model.policy and cfg.data_path("train").suffix == ".parquet"
    assert set(cfg.model.experts) == {pool.model for pool in cfg.gateway.discovery}  # every pool is routed


def test_model_and_data_default_to_the_tiny_world_and_bad_ones_are_refused(tmp_path):
    cfg = load_config(None, world={"dir": str(tmp_path / "w")})
    assert cfg.policy_path == tmp_path / "w" / "policy" and cfg.data_path("eval") == tmp_path / "w" / "eval.jsonl"
    with pytest.raises(ValueError, match="layout"):
        load_config(None, data={"train": {"path": "x.jsonl", "layout": "squad"}})
    with pytest.raises(ValueError, match="experts"):
        load_config(None, model={"experts": []})


def test_a_run_of_ones_own_model_data_and_experts_needs_no_tiny_world(tmp_path):
    own = {"model": {"policy": str(tmp_path / "m")}, "data": {"train": {"path": str(tmp_path / "t.jsonl")}}}
    assert load_config(None).uses_world
    assert load_config(None, **own).uses_world  # the pool still names the world's expert checkpoints
    assert not load_config(None, **own, expert_server={"pool": [str(tmp_path / "e")]}).uses_world


def test_an_expert_name_no_gateway_pool_serves_is_refused():
    pools = {"backends": [{"model": "expert", "url": "http://127.0.0.1:1"}], "aliases": {"solver": "expert"}}
    assert load_config(None, gateway=pools, model={"experts": ["expert", "solver"]}).model.experts == [
        "expert",
        "solver",
    ]
    with pytest.raises(ValueError, match=r"model.experts \['math'\] name no pool"):
        load_config(None, gateway=pools, model={"experts": ["expert", "math"]})


def test_role_seeds_derive_from_the_root_seed_unless_set():
    """One root seed: a role's seed follows it (distinct per role), an explicit one wins, the world stays put."""
    a, b = EAPOConfig(seed=0), EAPOConfig(seed=1)
    seeds_a = (a.rollout.seed, a.learner.seed, a.gateway.seed)
    seeds_b = (b.rollout.seed, b.learner.seed, b.gateway.seed)
    assert len(set(seeds_a)) == 3 and not set(seeds_a) & set(seeds_b)
    assert a.rollout.seed == derive_seed(0, "rollout") == EAPOConfig(seed=0).rollout.seed
    assert EAPOConfig(seed=1, learner={"seed": 5}).learner.seed == 5
    assert a.world.seed == b.world.seed == 1234


def test_internalize_settings_without_internalize_are_refused():
    with pytest.raises(ValidationError, match=r"learner\.internalize_weight, learner\.internalize_prompt set, but"):
        LearnerConfig(internalize_weight=4.0, internalize_prompt="evaluation")
    with pytest.raises(ValidationError, match=r"learner\.internalize_source set, but learner\.internalize is off"):
        LearnerConfig(internalize_source="expert")
    on = LearnerConfig(
        internalize=True, internalize_weight=4.0, internalize_prompt="evaluation", internalize_source="expert"
    )
    assert LearnerConfig.model_validate(on.model_dump()) == on  # a resolved config loads back
    off = LearnerConfig()
    assert LearnerConfig.model_validate(off.model_dump()) == off  # every field named, all at their defaults


def test_mini_batches_must_split_the_batch_into_whole_groups():
    assert LearnerConfig(batch_groups=8, mini_batches=4).mini_batches == 4
    with pytest.raises(ValidationError, match=r"mini_batches=3 must divide learner\.batch_groups=8"):
        LearnerConfig(batch_groups=8, mini_batches=3)
