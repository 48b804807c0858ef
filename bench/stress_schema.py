"""Phase 5: schemathesis (positive and negative cases) against the served OpenAPI schema.
"""

from __future__ import annotations

from collections import Counter

from stress_run import Run

# ------------------------------------------------------------------------------------------- schema


def phase_schema(run: Run) -> None:
    """schemathesis against the served schema: positive and negative cases for every operation."""
    try:
        import schemathesis
    except ImportError:
        run.begin("schema").violate("schemathesis is not installed: pip install -e '.[dev]'")
        return
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    phase = run.begin("schema")
    url = run.server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance, negative_data_rejection]
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]

    def checker(operation, mode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=run.plan.schema_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            phase.tried += 1
            try:
                response = case.call(base_url=url, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, not a crash
                phase.conn_errors += 1
                phase.violate(f"schema {operation.label}: {type(exc).__name__}: {exc}")
                return
            phase.answers[_schema_key(response)] += 1
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    title = f"{operation.label} [{mode.value}]: {failure.title}"
                    failures[title] += 1
                    examples.setdefault(title, f"{response.status_code} {response.text[:200]}")

        return check

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                checker(operation, mode)()
            except Unsatisfiable:   # no negative case exists for an operation without parameters or body
                pass
    for title, n in failures.items():
        phase.violate(f"schema: {title} (x{n}; e.g. {examples[title]})")
    phase.figures["schema operations x modes"] = (f"{len(operations)} x 2, "
                                                  f"{run.plan.schema_examples} examples each")
    phase.figures["schema conformance failures"] = str(sum(failures.values()))
    run.settle(phase)


def _schema_key(response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "(not JSON)"
    return f"{response.status_code} {code}"
