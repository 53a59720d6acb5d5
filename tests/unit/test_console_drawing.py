"""The console's SVG charts and workflow layout, without I/O."""

from __future__ import annotations

import uuid

from conveyor.api.console.drawing import bars, layout, workflow_graph
from conveyor.jobs.states import JobState
from conveyor.jobs.store.workflows import Step


def step(key: str, *after: str, state: JobState = JobState.PENDING) -> Step:
    return Step(key, uuid.uuid4(), "demo.echo", state, list(after), 0)


def test_steps_are_placed_in_columns_by_their_longest_path_from_a_root() -> None:
    steps = [step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"), step("e", "a", "d")]
    placed = {p.step.key: (p.column, p.row) for p in layout(steps)}
    assert placed == {"a": (0, 0), "b": (1, 0), "c": (1, 1), "d": (2, 0), "e": (3, 0)}


def test_the_graph_links_each_step_and_draws_each_edge() -> None:
    steps = [step("fetch", state=JobState.SUCCEEDED), step("load", "fetch")]
    svg = str(workflow_graph(steps, "/ui/jobs/{}"))
    assert svg.count("<line") == 1 and svg.count('class="node state-') == 2
    assert f'href="/ui/jobs/{steps[0].job_id}"' in svg and "state-succeeded" in svg


def test_names_in_the_graph_are_escaped() -> None:
    svg = str(workflow_graph([step("<script>")], "/ui/jobs/{}"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_bars_scale_to_the_largest_value_and_skip_missing_ones() -> None:
    svg = str(bars([1.0, None, 4.0, 0.0], label="jobs <per> minute"))
    assert svg.count("<rect") == 3
    assert 'height="54.0"' in svg and 'height="13.5"' in svg
    assert "jobs &lt;per&gt; minute" in svg


def test_a_jobs_timeline_has_a_section_per_run_and_per_retry() -> None:
    from types import SimpleNamespace

    from conveyor.api.console.pages import timeline

    names = [
        ("created", 0),
        ("claimed", 1),
        ("succeeded", 1),
    ]
    made = [SimpleNamespace(event=e, attempt=a) for e, a in names]
    assert [t for t, _ in timeline(made)] == ["Submitted", "Attempt 1"]
    names = [("created", 0), ("claimed", 1), ("dead", 1), ("requeued", 0), ("claimed", 1)]
    made = [SimpleNamespace(event=e, attempt=a) for e, a in names]
    sections = timeline(made)
    assert [t for t, _ in sections] == [
        "Submitted",
        "Attempt 1",
        "Queued again (1)",
        "Attempt 1 after retry 1",
    ]
    assert [len(found) for _, found in sections] == [1, 2, 1, 1]
