"""Fuzzing a running Tunery server from its own OpenAPI spec with schemathesis.

Each operation gets `max_examples` generated requests (valid and invalid); a request fails when
the server answers 5xx or a response that does not match the spec. Used by
tests/integration/test_hostile_input.py (a bounded run) and bench/fuzz_bench.py (a long one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def fuzz(base_url: str, max_examples: int, seed: int | None = 0) -> FuzzReport:
    """Run every operation of `base_url`'s /openapi.json; deterministic for a given seed."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    for result in schema.get_all_operations():
        _fuzz_operation(result.ok(), base_url, max_examples, seed, report)
    return report


def _fuzz_operation(
    operation: Any, base_url: str, max_examples: int, seed: int | None, report: FuzzReport
) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    label = operation.label

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=seed is not None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        report.cases += 1
        report.by_operation[label] = report.by_operation.get(label, 0) + 1
        case.call_and_validate(
            base_url=base_url,
            checks=[not_a_server_error, response_schema_conformance],
            timeout=60,
        )

    try:
        run()
    except Exception as e:  # keep going: report every failing operation, not just the first
        report.failures.append(f"{label}: {type(e).__name__}: {str(e)[:2000]}")
