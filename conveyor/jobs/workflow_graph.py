"""A workflow's steps as a graph: the checks made before anything is recorded.

Pure functions over keys and `after` lists, so that every refusal names the step it is
about (its index in the request) and nothing is written for a graph that is not a DAG.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_STEPS = 1000
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
RUN_IF = ("succeeded", "finished")


@dataclass(frozen=True, slots=True)
class GraphError:
    """One thing wrong with the graph: the step's index, the field, the reason."""

    index: int
    field: str
    message: str


def check_graph(keys: Sequence[str], after: Sequence[Sequence[str]]) -> list[GraphError]:
    """Everything wrong with these steps as a graph (empty when it is a DAG)."""
    errors: list[GraphError] = []
    seen: dict[str, int] = {}
    for index, key in enumerate(keys):
        if not KEY_PATTERN.fullmatch(key):
            errors.append(GraphError(index, "key", "1 to 64 of A-Z a-z 0-9 _ . -"))
        elif key in seen:
            errors.append(GraphError(index, "key", f"the key {key!r} is used by step {seen[key]}"))
        else:
            seen[key] = index
    for index, parents in enumerate(after):
        for parent in parents:
            if parent not in seen:
                errors.append(GraphError(index, "after", f"no step has the key {parent!r}"))
            elif parent == keys[index]:
                errors.append(GraphError(index, "after", "a step cannot run after itself"))
        if len(set(parents)) != len(parents):
            errors.append(GraphError(index, "after", "a step is named twice"))
    if errors:
        return errors
    cycle = _cycle(keys, after)
    if cycle:
        first = seen[cycle[0]]
        path = " -> ".join([*cycle, cycle[0]])
        errors.append(GraphError(first, "after", f"the steps form a cycle: {path}"))
    return errors


def _cycle(keys: Sequence[str], after: Sequence[Sequence[str]]) -> list[str]:
    """One cycle among the steps (keys in order), or [] (Kahn's algorithm, then a walk)."""
    children: dict[str, list[str]] = {key: [] for key in keys}
    waiting = {key: len(set(parents)) for key, parents in zip(keys, after, strict=True)}
    for key, parents in zip(keys, after, strict=True):
        for parent in set(parents):
            children[parent].append(key)
    ready = [key for key in keys if waiting[key] == 0]
    while ready:
        key = ready.pop()
        for child in children[key]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    left = {key for key, count in waiting.items() if count > 0}
    if not left:
        return []
    # Every step left has a parent left: walk back along them until one repeats.
    parents_of = dict(zip(keys, after, strict=True))
    walk: list[str] = []
    key = next(k for k in keys if k in left)
    while key not in walk:
        walk.append(key)
        key = next(p for p in parents_of[key] if p in left)
    cycle = walk[walk.index(key) :]
    cycle.reverse()  # in the order the steps would run, from the first step given
    first = min(range(len(cycle)), key=lambda i: keys.index(cycle[i]))
    return cycle[first:] + cycle[:first]
