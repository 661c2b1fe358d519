"""The log check every test node gets at teardown (`node.harness.log_problems`): what it must catch."""

from __future__ import annotations

from node.harness import log_problems

INFO = "2026-12-04 18:55:17,123 INFO    [101] node.scp: stored 20 instances of series 1.2.3"
ERROR = "2026-12-04 18:55:17,124 ERROR   [101] node.sender: delivery 4 to tps failed"
WARNING = "2026-12-04 18:55:17,125 WARNING [101] node.service: no destinations configured"
THREAD_CRASH = """Exception in thread completion-timer:
Traceback (most recent call last):
  File "/work/main/node/completion.py", line 80, in _fire
ValueError: boom"""


def test_an_error_record_is_a_problem_and_info_and_warnings_are_not():
    assert log_problems("\n".join([INFO, ERROR, WARNING]) + "\n") == [ERROR]
    assert log_problems("\n".join([INFO, WARNING])) == []


def test_a_traceback_printed_by_a_background_thread_is_a_problem_with_the_record_it_follows():
    (problem,) = log_problems("\n".join([INFO, THREAD_CRASH, WARNING]))
    assert problem == f"{INFO}\n{THREAD_CRASH}"
    (problem,) = log_problems(THREAD_CRASH)  # at the very start of the log too
    assert problem == THREAD_CRASH


def test_uvicorn_errors_and_critical_records_are_problems():
    uvicorn = "ERROR:    Exception in ASGI application"
    critical = ERROR.replace("ERROR  ", "CRITICAL")
    assert log_problems("\n".join([INFO, uvicorn])) == [f"{INFO}\n{uvicorn}"]
    assert log_problems(critical) == [critical]


def test_a_problem_a_test_provokes_is_allowed_by_its_pattern_only():
    log = "\n".join([ERROR, INFO, THREAD_CRASH])
    assert log_problems(log, (r"delivery \d+ to tps failed",)) == [f"{INFO}\n{THREAD_CRASH}"]
    assert log_problems(log, (r"delivery \d+ to tps failed", r"ValueError: boom")) == []
