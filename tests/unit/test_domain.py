"""The transition table and the liveness rules of the pure domain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runsvc.domain import (
    ACTIVE_STATES,
    FINISH_EVENTS,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    LivenessPolicy,
    RunOutcome,
    RunState,
    StopReason,
    finalization_for_lost_run,
    run_number,
    sources,
    target,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_active_and_terminal_states_partition_the_run_states() -> None:
    assert ACTIVE_STATES == {RunState.PENDING, RunState.RUNNING}
    assert ACTIVE_STATES.isdisjoint(TERMINAL_STATES)
    assert ACTIVE_STATES | TERMINAL_STATES == set(RunState)


def test_every_event_appears_in_the_table() -> None:
    assert {event for (_, event) in TRANSITIONS} == set(Event)


@pytest.mark.parametrize("event", list(Event))
def test_every_event_has_exactly_one_target(event: Event) -> None:
    targets = {dst for (_, ev), dst in TRANSITIONS.items() if ev is event}
    assert len(targets) == 1
    assert target(event) == targets.pop()


@pytest.mark.parametrize("event", list(Event))
def test_sources_match_the_table(event: Event) -> None:
    expected = frozenset(src for (src, ev) in TRANSITIONS if ev is event)
    assert sources(event) == expected
    assert sources(event), f"{event} can fire from no state"


def test_sources_and_targets_of_named_events() -> None:
    assert sources(Event.CLAIM) == {RunState.PENDING}
    assert target(Event.CLAIM) is RunState.RUNNING
    assert sources(Event.RESUME) == {RunState.RUNNING}
    assert target(Event.RESUME) is RunState.RUNNING
    assert sources(Event.FORCE_CANCEL) == {RunState.PENDING, RunState.RUNNING}
    assert target(Event.FORCE_CANCEL) is RunState.CANCELLED
    assert sources(Event.CANCEL_PENDING) == {RunState.PENDING}
    assert target(Event.LOST) is RunState.STOPPED
    assert target(Event.LOST_WHILE_CANCELLING) is RunState.CANCELLED
    assert target(Event.FINISH_COMPLETED) is RunState.COMPLETED
    assert target(Event.FINISH_FAILED) is RunState.FAILED
    assert target(Event.FINISH_CANCELLED) is RunState.CANCELLED


def test_no_transition_leaves_a_terminal_state() -> None:
    leaving = [(src, ev) for (src, ev) in TRANSITIONS if src in TERMINAL_STATES]
    assert leaving == []


def test_every_non_terminal_state_can_reach_a_terminal_state() -> None:
    edges: dict[RunState, set[RunState]] = {}
    for (src, _), dst in TRANSITIONS.items():
        edges.setdefault(src, set()).add(dst)
    for start in ACTIVE_STATES:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in edges.get(frontier.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & TERMINAL_STATES, f"{start} cannot reach a terminal state"


def test_every_terminal_state_is_reachable() -> None:
    assert set(TRANSITIONS.values()) >= TERMINAL_STATES


def test_finish_events_cover_every_outcome_and_lead_to_its_state() -> None:
    assert set(FINISH_EVENTS) == set(RunOutcome)
    for outcome, event in FINISH_EVENTS.items():
        assert target(event) == RunState(outcome.value)
        assert sources(event) == {RunState.RUNNING}


@pytest.mark.parametrize("reason", list(StopReason))
def test_lost_run_with_cancel_request_ends_cancelled_by_user(reason: StopReason) -> None:
    final = finalization_for_lost_run(cancel_requested=True, reason=reason)
    assert final.event is Event.LOST_WHILE_CANCELLING
    assert final.state is RunState.CANCELLED
    assert final.reason is StopReason.CANCELLED_BY_USER


@pytest.mark.parametrize(
    "reason",
    [StopReason.HEARTBEAT_TIMEOUT, StopReason.STARTUP_CLEANUP, StopReason.EMPTY_QUEUE],
)
def test_lost_run_without_cancel_request_stops_with_the_given_reason(reason: StopReason) -> None:
    final = finalization_for_lost_run(cancel_requested=False, reason=reason)
    assert final.event is Event.LOST
    assert final.state is RunState.STOPPED
    assert final.reason is reason


def test_liveness_defaults_are_the_seed_values() -> None:
    policy = LivenessPolicy()
    assert policy.stale_after == timedelta(seconds=30)
    assert policy.startup_cleanup_after == timedelta(minutes=5)
    assert policy.cancel_grace == timedelta(seconds=60)


def test_liveness_horizons_with_defaults() -> None:
    policy = LivenessPolicy()
    assert policy.stale_horizon(NOW) == NOW - timedelta(seconds=30)
    assert policy.startup_horizon(NOW) == NOW - timedelta(seconds=300)
    assert policy.cancel_horizon(NOW) == NOW - timedelta(seconds=60)
    assert policy.stale_time(NOW) == NOW + timedelta(seconds=30)


def test_liveness_with_a_fractional_stale_after() -> None:
    policy = LivenessPolicy(
        stale_after=timedelta(seconds=1.5),
        startup_cleanup_after=timedelta(seconds=7),
        cancel_grace=timedelta(seconds=2.25),
    )
    assert policy.stale_horizon(NOW) == NOW - timedelta(milliseconds=1500)
    assert policy.startup_horizon(NOW) == NOW - timedelta(seconds=7)
    assert policy.cancel_horizon(NOW) == NOW - timedelta(milliseconds=2250)
    heartbeat = NOW - timedelta(seconds=1)
    assert policy.stale_time(heartbeat) == NOW + timedelta(milliseconds=500)
    # A heartbeat is stale exactly when it is older than the stale horizon.
    assert heartbeat > policy.stale_horizon(NOW)
    assert NOW - timedelta(seconds=2) < policy.stale_horizon(NOW)
    assert policy.stale_time(heartbeat).tzinfo is UTC


def test_silence_counts_from_when_database_access_was_regained() -> None:
    policy = LivenessPolicy(stale_after=timedelta(seconds=30))
    # Trusted long ago: the ordinary horizon.
    assert policy.trusted_stale_horizon(NOW, NOW - timedelta(hours=1)) == NOW - timedelta(
        seconds=30
    )
    # Access regained 10 s ago: no run may be judged stale, however old its heartbeat.
    assert policy.trusted_stale_horizon(NOW, NOW - timedelta(seconds=10)) is None
    # Exactly at the threshold: not yet (stale means strictly older).
    assert policy.trusted_stale_horizon(NOW, NOW - timedelta(seconds=30)) is None
    assert policy.trusted_stale_horizon(NOW, NOW - timedelta(seconds=31)) == NOW - timedelta(
        seconds=30
    )
    # No trusted access at all: nothing is stale.
    assert policy.trusted_stale_horizon(NOW, None) is None


@pytest.mark.parametrize("last_age", [0, 10, 29, 31, 45, 100])
@pytest.mark.parametrize("trust_age", [0, 10, 29, 31, 45, 100])
def test_trusted_horizon_is_the_max_rule(last_age: int, trust_age: int) -> None:
    """stale  <=>  now - max(last_sign_of_life, trusted_since) > stale_after."""
    policy = LivenessPolicy(stale_after=timedelta(seconds=30))
    last = NOW - timedelta(seconds=last_age)
    trusted = NOW - timedelta(seconds=trust_age)
    horizon = policy.trusted_stale_horizon(NOW, trusted)
    judged_stale = horizon is not None and last < horizon
    assert judged_stale == (NOW - max(last, trusted) > timedelta(seconds=30))


def test_breaker_trips_on_more_than_the_share_of_enough_running_runs() -> None:
    policy = LivenessPolicy()
    assert policy.breaker_share == 0.5 and policy.breaker_min_running == 4
    assert not policy.breaker_trips(stale=2, running=4)  # exactly half: stop them
    assert policy.breaker_trips(stale=3, running=4)
    assert policy.breaker_trips(stale=1000, running=1000)
    assert not policy.breaker_trips(stale=3, running=3)  # too few runs to tell an outage
    assert not policy.breaker_trips(stale=0, running=100)
    strict = LivenessPolicy(breaker_share=0.1, breaker_min_running=10)
    assert strict.breaker_trips(stale=2, running=10)
    assert not strict.breaker_trips(stale=1, running=10)


def test_trust_starts_untrusted_and_is_regained_by_a_clean_commit() -> None:
    from runsvc.trust import TrustTracker

    trust = TrustTracker()
    assert trust.since is None
    first = trust.begin(NOW)
    trust.committed(first)
    assert trust.since == NOW
    later = trust.begin(NOW + timedelta(seconds=5))
    trust.committed(later)
    assert trust.since == NOW  # uninterrupted: still from the first commit
    in_flight = trust.begin(NOW + timedelta(seconds=6))
    trust.failed()
    assert trust.since is None
    trust.committed(in_flight)  # began before the failure: proves nothing after it
    assert trust.since is None
    regained = trust.begin(NOW + timedelta(seconds=9))
    trust.committed(regained)
    assert trust.since == NOW + timedelta(seconds=9)


def test_slot_check_allows_more_in_redis_only_while_releases_wait() -> None:
    from runsvc.store.check import slot_violations

    assert slot_violations({"a": (2, 2), "b": (0, 0)}, pending_releases=0) == []
    assert slot_violations({"a": (3, 2)}, pending_releases=1) == []
    assert [v.kind for v in slot_violations({"a": (3, 2)}, pending_releases=0)] == ["SLOTS"]
    assert [v.kind for v in slot_violations({"a": (1, 2)}, pending_releases=5)] == ["SLOTS"]
    kinds = [v.kind for v in slot_violations({"a": (None, 2)}, pending_releases=0)]
    assert kinds == ["SLOTS_UNREADABLE"]


@pytest.mark.parametrize(
    ("ref", "number"),
    [
        ("123", 123),
        ("007", 7),
        ("7d1f5b8e-0000-4000-8000-000000000001", None),
        ("", None),
        ("-1", None),
        ("1e3", None),
        ("١٢", None),  # digits, but not ASCII ones
    ],
)
def test_a_run_reference_of_ascii_digits_names_a_number(ref: str, number: int | None) -> None:
    assert run_number(ref) == number
