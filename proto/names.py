"""Stream, group and key names: the one place every service takes them from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """All Redis names of one run, under ``prefix`` (one Redis may serve several runs)."""

    prefix: str = "eapo"

    @property
    def trajectories(self) -> str:
        return f"{self.prefix}:stream:trajectories"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}:stream:prompts"

    def dead_letter(self, stream: str) -> str:
        return f"{stream}:dead"

    learner_group: str = "learner"
    rollout_group: str = "rollout"

    @property
    def anneal(self) -> str:
        """Key holding the current AnnealState (codec bytes)."""
        return f"{self.prefix}:anneal"

    @property
    def weights(self) -> str:
        """Key holding the latest published WeightManifest (codec bytes)."""
        return f"{self.prefix}:weights:latest"

    @property
    def weights_channel(self) -> str:
        """Pub/sub channel announcing each new weight version (its number as text)."""
        return f"{self.prefix}:weights:announce"

    @property
    def counters(self) -> str:
        """Hash of run-wide counters (admitted prompts, rejections by reason, …)."""
        return f"{self.prefix}:counters"

    @property
    def prompt_streaks(self) -> str:
        """Hash problem id → how many of its groups in a row had no outcome signal (``learner/feeder.py``)."""
        return f"{self.prefix}:prompt:streaks"

    @property
    def trained(self) -> str:
        """Sorted set of the group ids the learner trained on, scored by their prompt's admission time
        (ms); ids older than ``learner.dedup_horizon_s`` are removed (``learner/ledger.py``)."""
        return f"{self.prefix}:trained"

    @property
    def rollout_versions(self) -> str:
        """Hash replica → JSON {version, at}: weight versions rollouts load, spared by garbage collection."""
        return f"{self.prefix}:rollout:versions"

    @property
    def done(self) -> str:
        """Set when the learner finished its steps: rollout replicas drain and exit."""
        return f"{self.prefix}:done"
