"""The reliability table's own arithmetic: what it reports must be what was recorded."""

from reliability import attack_tally


def entry(scenario: str, value: int, limit: int | None) -> dict:
    return {"scenario": scenario, "metric": "m", "value": value, "limit": limit,
            "ok": None if limit is None else value <= limit}  # fmt: skip


def test_attacks_are_the_limited_figures_of_attack_scenarios_and_held_when_within_the_limit():
    entries = [
        entry("attack: broker auth", 0, 0),
        entry("attack: broker auth", 1, 0),  # got through
        entry("attack: hub web", 0, 0),
        entry("attack: hub web", 7, None),  # reported only: not an attack
        entry("broker restart", 0, 0),  # a reliability scenario, not an attack
    ]
    assert attack_tally(entries) == (3, 2)
    assert attack_tally([]) == (0, 0)
