"""Fuzzing the ``segkit`` command: hostile configs, COCO files, results files, label maps and VOC folders.

Each test draws a fixed, reproducible set of cases (hypothesis, ``derandomize=True``) that edit a valid input
(the tiny detector and segmentor configs, a COCO file of the generated Shapes data, results made from it,
its label maps, its VOC export) and runs each through the real command line in a worker process
(``fuzz_harness.py``). Every case must end with exit status 0, or 2 and one ``segkit: error:`` paragraph without
a traceback (1 only for ``segkit data check`` finding errors); never crash the interpreter, never hang, never
write outside its work_dir / --out. A test runs all its cases, then lists every distinct failure with a command
that reproduces it. How many cases each target ran, and how they ended, is printed at the end of the session.

The ``slow`` variants run many more cases (``SEGKIT_FUZZ_EXAMPLES`` per target, default 300).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_config_cases import config_cases  # noqa: E402
from fuzz_file_cases import coco_cases, results_cases, semseg_cases, voc_cases  # noqa: E402
from fuzz_harness import Case, FuzzRunner, memory_guard  # noqa: E402
from fuzz_shared import Shared  # noqa: E402

# cases per target in the default suite: about 50 s in all on two idle cores
DEFAULT_EXAMPLES = {"config": 60, "coco": 50, "results": 60, "semseg": 100, "voc": 50}
SLOW_EXAMPLES = int(os.environ.get("SEGKIT_FUZZ_EXAMPLES", "300"))
STRATEGIES = {"config": config_cases, "coco": coco_cases, "results": results_cases, "semseg": semseg_cases,
              "voc": voc_cases}


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[FuzzRunner]:
    """The runner (one worker process for the module), reporting its counts at the end of the session."""
    runner = FuzzRunner(tmp_path_factory.mktemp("fuzz_cli"))
    runner.worker.spawn()  # imports torch while the shared data is made
    request.config.pluginmanager.register(_CountsReport(runner), f"fuzz-counts-{id(runner)}")
    yield runner
    runner.close()
    counts = {target: {"cases": t.cases, "exits": {str(k): v for k, v in t.exits.items()}, "failures": t.failures,
                       "seconds": round(t.seconds, 1)} for target, t in runner.tallies.items()}
    (runner.root / "counts.json").write_text(json.dumps(counts, indent=2))


@pytest.fixture(scope="module")
def shared(fuzz: FuzzRunner, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """The valid inputs, protected: a case that changes them fails."""
    made = Shared(tmp_path_factory.mktemp("fuzz_shared"), fuzz)
    fuzz.protected.append(made.root)
    # the configs name this Shapes cache: other generation arguments (num_images: null...) add data there
    fuzz.caches.append(made.root / "data" / "shapes")
    return made


class _CountsReport:
    """Prints how many cases each target ran and how they ended, after the test results."""

    def __init__(self, runner: FuzzRunner) -> None:
        self.runner = runner

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tallies = {k: v for k, v in self.runner.tallies.items() if k != "setup"}
        if not tallies:
            return
        terminalreporter.section("segkit command-line fuzzing")
        for target, tally in tallies.items():
            terminalreporter.write_line(tally.line(target))
        terminalreporter.write_line(f"worker restarts after a crash or a hang: {self.runner.worker.restarts}; "
                                    f"every case: {self.runner.log}")


def run_target(fuzz: FuzzRunner, target: str, strategy: st.SearchStrategy[Case], max_examples: int) -> None:
    """Run ``max_examples`` cases of ``strategy`` (the same ones on every run), then fail listing what broke."""

    @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one_case(case: Case) -> None:
        fuzz.run(case)

    with memory_guard():
        one_case()
    assert not any(case.target == target for case, _ in fuzz.failures), fuzz.report(target)


def test_hostile_config_values_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared):
    run_target(fuzz, "config", config_cases(shared), DEFAULT_EXAMPLES["config"])


def test_broken_coco_annotation_files_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared):
    run_target(fuzz, "coco", coco_cases(shared), DEFAULT_EXAMPLES["coco"])


def test_broken_coco_results_files_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared):
    run_target(fuzz, "results", results_cases(shared), DEFAULT_EXAMPLES["results"])


def test_broken_label_maps_and_class_lists_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared):
    run_target(fuzz, "semseg", semseg_cases(shared), DEFAULT_EXAMPLES["semseg"])


def test_broken_voc_files_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared):
    run_target(fuzz, "voc", voc_cases(shared), DEFAULT_EXAMPLES["voc"])


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(STRATEGIES))
def test_many_hostile_inputs_end_in_a_clean_exit(fuzz: FuzzRunner, shared: Shared, target: str):
    run_target(fuzz, target, STRATEGIES[target](shared), SLOW_EXAMPLES)
