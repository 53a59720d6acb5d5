"""The state machine table: which edges exist, and which never may."""

from __future__ import annotations

import pytest

from conveyor.jobs.states import (
    CANCELLABLE_STATES,
    REQUEUEABLE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    WAITING_STATES,
    JobState,
    Priority,
    can_move,
)

S = JobState


def test_the_states_of_the_contract() -> None:
    assert {s.value for s in JobState} == {
        "pending",
        "scheduled",
        "queued",
        "running",
        "retrying",
        "succeeded",
        "dead",
        "cancelled",
    }
    assert {p.value for p in Priority} == {"high", "default", "low"}


def test_table_covers_every_state_and_the_start() -> None:
    assert set(TRANSITIONS) == {None, *JobState}


def test_jobs_start_pending_scheduled_or_queued() -> None:
    assert TRANSITIONS[None] == {S.PENDING, S.SCHEDULED, S.QUEUED}


def test_terminal_states() -> None:
    assert {S.SUCCEEDED, S.DEAD, S.CANCELLED} == TERMINAL_STATES


def test_succeeded_has_no_exit() -> None:
    assert TRANSITIONS[S.SUCCEEDED] == frozenset()


@pytest.mark.parametrize("state", [S.DEAD, S.CANCELLED])
def test_dead_and_cancelled_leave_only_by_requeue(state: JobState) -> None:
    # Pending: a workflow step retried before its parents are done, or resumed.
    assert TRANSITIONS[state] == {S.QUEUED, S.PENDING}


def test_only_dead_and_cancelled_are_requeueable() -> None:
    assert {S.DEAD, S.CANCELLED} == REQUEUEABLE_STATES
    terminal_with_exits = {s for s in TERMINAL_STATES if TRANSITIONS[s]}
    assert terminal_with_exits == REQUEUEABLE_STATES


def test_every_edge_of_the_contract() -> None:
    edges = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == {
        (None, S.PENDING),  # a workflow step with parents
        (None, S.SCHEDULED),
        (None, S.QUEUED),
        (S.PENDING, S.QUEUED),  # released: its parents are done
        (S.PENDING, S.CANCELLED),  # cancelled, or upstream_failed
        (S.SCHEDULED, S.QUEUED),  # promote
        (S.SCHEDULED, S.CANCELLED),
        (S.QUEUED, S.RUNNING),  # claim
        (S.QUEUED, S.CANCELLED),
        (S.QUEUED, S.DEAD),  # exhaust
        (S.QUEUED, S.SCHEDULED),  # defer: over a flow-control limit
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.RETRYING),
        (S.RUNNING, S.DEAD),
        (S.RUNNING, S.QUEUED),  # release
        (S.RUNNING, S.CANCELLED),
        (S.RETRYING, S.QUEUED),  # promote
        (S.RETRYING, S.CANCELLED),
        (S.DEAD, S.QUEUED),  # requeue
        (S.DEAD, S.PENDING),  # requeue of a step whose parents are not done
        (S.CANCELLED, S.QUEUED),  # requeue
        (S.CANCELLED, S.PENDING),  # resumed: the parent that failed is retried
    }


def test_no_state_moves_to_itself() -> None:
    for state in JobState:
        assert not can_move(state, state)


def test_nothing_returns_to_the_start_states_but_through_the_table() -> None:
    # The start reaches scheduled, and so does a queued job deferred by flow control;
    # running is reached only by a claim.
    assert {a for a, targets in TRANSITIONS.items() if S.SCHEDULED in targets} == {None, S.QUEUED}
    assert {a for a, targets in TRANSITIONS.items() if S.RUNNING in targets} == {S.QUEUED}
    assert {a for a, targets in TRANSITIONS.items() if S.SUCCEEDED in targets} == {S.RUNNING}
    assert {a for a, targets in TRANSITIONS.items() if S.RETRYING in targets} == {S.RUNNING}


def test_cancellable_states_are_exactly_those_with_an_edge_to_cancelled() -> None:
    assert {s for s in JobState if can_move(s, S.CANCELLED)} == CANCELLABLE_STATES
    assert {S.PENDING, S.SCHEDULED, S.QUEUED, S.RETRYING, S.RUNNING} == CANCELLABLE_STATES
    assert not CANCELLABLE_STATES & TERMINAL_STATES


def test_waiting_states_leave_for_queued_or_cancelled() -> None:
    assert {S.SCHEDULED, S.RETRYING} == WAITING_STATES
    for state in WAITING_STATES:
        assert TRANSITIONS[state] == {S.QUEUED, S.CANCELLED}


def test_every_state_is_reachable_and_can_finish() -> None:
    reachable: set[JobState | None] = {None}
    frontier: list[JobState | None] = [None]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == {None, *JobState}

    for state in JobState:
        seen, stack = {state}, [state]
        while stack:
            for target in TRANSITIONS[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        assert seen & TERMINAL_STATES, state


@pytest.mark.parametrize("source", [None, *JobState])
def test_can_move_agrees_with_the_table(source: JobState | None) -> None:
    for target in JobState:
        assert can_move(source, target) is (target in TRANSITIONS[source])


def test_can_move_examples() -> None:
    assert can_move(None, S.QUEUED)
    assert can_move(S.QUEUED, S.RUNNING)
    assert can_move(S.DEAD, S.QUEUED)
    assert not can_move(None, S.RUNNING)
    assert not can_move(S.SUCCEEDED, S.QUEUED)
    assert not can_move(S.DEAD, S.RUNNING)
    assert not can_move(S.CANCELLED, S.CANCELLED)
    assert not can_move(S.SCHEDULED, S.RUNNING)
    assert not can_move(S.RETRYING, S.RUNNING)
