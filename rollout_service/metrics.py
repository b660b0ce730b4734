"""Rollout counters, exported on Prometheus (``rollout.metrics_port``)."""

from prometheus_client import Counter, Gauge

EPISODES = Counter("eapo_rollout_episodes_total", "Finished episodes by how they ended", ["finish"])
CONSULTS = Counter("eapo_rollout_consult_queries_total", "Expert queries by outcome", ["outcome", "accepted"])
PARSE_ISSUES = Counter("eapo_rollout_consult_parse_issues_total", "Consult-block malformations by rule", ["issue"])
GROUPS = Counter("eapo_rollout_groups_total", "Trajectory groups pushed to the learner")
POLICY_VERSION = Gauge("eapo_rollout_policy_version", "Weight version the policy engine serves")
