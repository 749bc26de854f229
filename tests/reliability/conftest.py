"""The reliability suite's session summary: cases tried per category, failures, known defects."""

from __future__ import annotations

from collections import Counter

import pytest
from reliability_support import CASES, CATEGORIES, COUNTED, category_of, count

ITEMS: Counter[str] = Counter()
FAILED: Counter[str] = Counter()
DEFECTS: Counter[str] = Counter()  # strict xfails: known defects in files other helpers own
SKIPPED: Counter[str] = Counter()


@pytest.fixture
def tally(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """count(n): record n cases tried by this test (hypothesis examples, payloads, faults)."""
    nodeid = request.node.nodeid
    return lambda cases=1: count(nodeid, cases)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/reliability/" not in report.nodeid.replace("\\", "/"):
        return
    category = category_of(report.nodeid)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        ITEMS[category] += 1
        if report.nodeid not in COUNTED and not report.skipped:
            count(report.nodeid, 1)
        if hasattr(report, "wasxfail"):
            DEFECTS[category] += 1
        elif report.skipped:
            SKIPPED[category] += 1
        elif report.failed:
            FAILED[category] += 1
    elif report.when == "teardown" and report.failed:
        FAILED[category] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ITEMS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("qlc reliability summary")
    write(
        f"{'category':<22}{'tests':>7}{'cases':>9}{'failures':>10}{'known defects':>15}"
        f"{'skipped':>9}"
    )
    names = [*sorted(set(CATEGORIES.values())), "other"]  # modules may share a category
    for name in names:
        if ITEMS[name]:
            write(
                f"{name:<22}{ITEMS[name]:>7}{CASES[name]:>9}{FAILED[name]:>10}"
                f"{DEFECTS[name]:>15}{SKIPPED[name]:>9}"
            )
    write(
        f"{'total':<22}{sum(ITEMS.values()):>7}{sum(CASES.values()):>9}"
        f"{sum(FAILED.values()):>10}{sum(DEFECTS.values()):>15}{sum(SKIPPED.values()):>9}"
    )
    write("known defects: strict xfails, each naming a defect in a file another engineer owns")
