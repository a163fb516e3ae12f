"""Client-level (central) DP accounting for Flower's fixed-clipping wrapper, on Opacus' RDP.

Flower's own ``RdpAccountant`` needs Google's ``dp-accounting`` package; Opacus (already
a dependency) computes the same Renyi bound. Each round is one Gaussian release of the
clipped mean without sampling amplification (every client takes part), so it composes
as Opacus' sampled Gaussian with sample rate 1.
"""

from __future__ import annotations

from fedswarm.common.flower_internals import GaussianPrivacyEvent, PrivacyConfig, PrivacySpent


class OpacusRdpAccountant:
    """Implements Flower's ``PrivacyAccountant`` protocol with Opacus' RDP accountant."""

    def __init__(self, config: PrivacyConfig) -> None:
        self._config = config
        self._events: list[tuple[float, int]] = []  # (noise multiplier, releases)

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(n for _, n in self._events)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self._events.append((float(event.noise_multiplier), int(count)))

    def _epsilon(self, events: list[tuple[float, int]], delta: float) -> float:
        from opacus.accountants import RDPAccountant

        if not events:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(sigma, 1.0, n) for sigma, n in events]
        return float(accountant.get_epsilon(delta))

    def get_epsilon(self, delta: float) -> float:
        return self._epsilon(self._events, delta)

    def get_delta(self, epsilon: float) -> float:
        raise NotImplementedError("fedswarm reports epsilon at a fixed delta")

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(self.get_epsilon(delta), delta, self.num_releases, "rdp (opacus)")

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        events = self._events + [(float(event.noise_multiplier), count)]
        return self._epsilon(events, self._config.target_delta) > limit

    def state_dict(self) -> dict[str, object]:
        return {"events": [list(e) for e in self._events]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        events = state["events"]
        if not isinstance(events, list):
            raise ValueError(f"central DP accountant state: events must be a list, got {events!r}")
        self._events = [(float(s), int(n)) for s, n in events]
