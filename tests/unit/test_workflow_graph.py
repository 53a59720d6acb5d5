from conveyor.jobs.workflow_graph import check_graph


def messages(keys: list[str], after: list[list[str]]) -> list[tuple[int, str, str]]:
    return [(e.index, e.field, e.message) for e in check_graph(keys, after)]


def test_a_dag_passes() -> None:
    assert messages(["a", "b", "c", "d"], [[], ["a"], ["a"], ["b", "c"]]) == []


def test_keys_must_be_unique_and_well_formed() -> None:
    found = messages(["a", "a", "no spaces", "x" * 65], [[], [], [], []])
    assert found == [
        (1, "key", "the key 'a' is used by step 0"),
        (2, "key", "1 to 64 of A-Z a-z 0-9 _ . -"),
        (3, "key", "1 to 64 of A-Z a-z 0-9 _ . -"),
    ]


def test_after_must_name_other_known_steps_once() -> None:
    found = messages(["a", "b", "c"], [["a"], ["nope"], ["a", "a"]])
    assert found == [
        (0, "after", "a step cannot run after itself"),
        (1, "after", "no step has the key 'nope'"),
        (2, "after", "a step is named twice"),
    ]


def test_a_cycle_is_named_with_its_steps() -> None:
    found = messages(["a", "b", "c", "d"], [[], ["d"], ["b"], ["c"]])
    assert found == [(1, "after", "the steps form a cycle: b -> c -> d -> b")]


def test_a_long_chain_is_checked_without_recursion() -> None:
    keys = [f"s{i}" for i in range(1000)]
    after = [[]] + [[keys[i - 1]] for i in range(1, 1000)]
    assert messages(keys, after) == []
    after[0] = [keys[-1]]
    [(index, field, message)] = messages(keys, after)
    assert (index, field) == (0, "after") and message.startswith("the steps form a cycle: s0 -> s1")
