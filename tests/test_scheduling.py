"""The suite's own xdist scheduling (tests/conftest.py): which tests share a worker, and which units go out first."""

from pathlib import Path

from tests.conftest import DEBUG_RUN_GROUP, DEBUG_RUN_MODULES, LONGEST_FIRST, _group, _send_order

TESTS = Path(__file__).resolve().parent


def test_the_units_sent_first_exist():
    """A renamed or removed module left in LONGEST_FIRST would silently go out in collection order."""
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    assert set(LONGEST_FIRST) - {DEBUG_RUN_GROUP} <= modules, set(LONGEST_FIRST) - modules
    assert set(DEBUG_RUN_MODULES) <= modules and LONGEST_FIRST[0] == DEBUG_RUN_GROUP


def test_debug_run_readers_share_one_unit_and_go_out_first():
    ids = [f"tests/{m}.py::test_x" for m in DEBUG_RUN_MODULES]
    assert {_group(i) for i in ids} == {DEBUG_RUN_GROUP}
    assert _group("tests/test_layout.py::test_y[a]") == "tests/test_layout.py"
    collected = ["tests/test_layout.py::a", "tests/test_demo.py::b", "tests/test_train.py::c", "tests/test_layout.py::d"]
    assert sorted(collected, key=_send_order) == ["tests/test_train.py::c", "tests/test_demo.py::b",
                                                  "tests/test_layout.py::a", "tests/test_layout.py::d"]
