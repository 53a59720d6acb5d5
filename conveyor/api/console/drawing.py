"""Charts and workflow graphs drawn as inline SVG on the server: no script needed to read."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

from conveyor.jobs.store.workflows import Step

CHART_WIDTH = 300
CHART_HEIGHT = 56

STATE_COLOURS = {
    "pending": "#9aa4b1",
    "scheduled": "#8a7fd4",
    "queued": "#5b8def",
    "running": "#e0a526",
    "retrying": "#e07b26",
    "succeeded": "#2f9e5a",
    "dead": "#d64545",
    "cancelled": "#6b7280",
}


def bars(values: list[float | None], *, label: str, unit: str = "") -> Markup:
    """A bar per value, scaled to the largest; a title on each bar names its value."""
    top = max((v for v in values if v is not None), default=0.0) or 1.0
    step = CHART_WIDTH / max(len(values), 1)
    parts = []
    for index, value in enumerate(values):
        if value is None:
            continue
        height = max(1.0, (CHART_HEIGHT - 2) * value / top) if value > 0 else 0.0
        parts.append(
            f'<rect x="{index * step:.1f}" y="{CHART_HEIGHT - height:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{height:.1f}">'
            f"<title>{_number(value)}{escape(unit)}</title></rect>"
        )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'preserveAspectRatio="none" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>{''.join(parts)}</svg>"
    )


def _number(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.3g}"


@dataclass(frozen=True, slots=True)
class Placed:
    """A step and where the graph draws it."""

    step: Step
    column: int
    row: int


NODE_WIDTH = 150
NODE_HEIGHT = 34
GAP_X = 40
GAP_Y = 14


def layout(steps: list[Step]) -> list[Placed]:
    """Steps in columns by depth (longest path from a root), rows in the order given."""
    depth: dict[str, int] = {}
    by_key = {step.key: step for step in steps}

    def depth_of(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key in depth:
            return depth[key]
        parents = [p for p in by_key[key].after if p in by_key and p not in seen]
        found = 0 if not parents else 1 + max(depth_of(p, seen | {key}) for p in parents)
        depth[key] = found
        return found

    rows: dict[int, int] = {}
    placed = []
    for step in steps:
        column = depth_of(step.key)
        row = rows.get(column, 0)
        rows[column] = row + 1
        placed.append(Placed(step, column, row))
    return placed


def workflow_graph(steps: list[Step], link: str) -> Markup:
    """The steps as boxes coloured by state, with an arrow from each parent to its child.

    `link` is a format string taking a job id: each box links to its job's page.
    """
    placed = layout(steps)
    where = {p.step.key: p for p in placed}
    columns = 1 + max((p.column for p in placed), default=0)
    rows = 1 + max((p.row for p in placed), default=0)
    width = columns * (NODE_WIDTH + GAP_X)
    height = rows * (NODE_HEIGHT + GAP_Y)

    def box(p: Placed) -> tuple[float, float]:
        return p.column * (NODE_WIDTH + GAP_X), p.row * (NODE_HEIGHT + GAP_Y)

    edges = []
    for child in placed:
        cx, cy = box(child)
        for parent_key in child.step.after:
            parent = where.get(parent_key)
            if parent is None:
                continue
            px, py = box(parent)
            edges.append(
                f'<line x1="{px + NODE_WIDTH:.0f}" y1="{py + NODE_HEIGHT / 2:.0f}" '
                f'x2="{cx:.0f}" y2="{cy + NODE_HEIGHT / 2:.0f}" marker-end="url(#arrow)"/>'
            )
    nodes = []
    for p in placed:
        x, y = box(p)
        state = p.step.state.value
        name = p.step.key if len(p.step.key) <= 18 else p.step.key[:17] + "…"
        nodes.append(
            f'<a href="{escape(link.format(p.step.job_id))}" class="node state-{state}">'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" '
            f'rx="5" fill="{STATE_COLOURS.get(state, "#999")}"/>'
            f'<text x="{x + 8:.0f}" y="{y + 15:.0f}">{escape(name)}</text>'
            f'<text x="{x + 8:.0f}" y="{y + 28:.0f}" class="sub">{escape(state)}</text>'
            f"<title>{escape(p.step.key)}: {escape(p.step.task)}, {escape(state)}</title></a>"
        )
    return Markup(
        f'<svg class="graph" viewBox="0 0 {width} {height}" width="{width}" role="img" '
        f'aria-label="workflow graph">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker>'
        f'</defs><g class="edges">{"".join(edges)}</g>{"".join(nodes)}</svg>'
    )
