"""dist.gather_object: everything to one root (Horovod alltoall), under horovodrun with Gloo and MPI."""
import pytest

from hvd_megdet import dist
from tests.harness import CONTROLLERS, launch
from tests.workers.gather_checks import digest, payload


def test_single_process():
    assert dist.gather_object({"a": [1]}) == [{"a": [1]}] and dist.gather_object(None, name="x") == [None]


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_gather_to_one_root(tmp_path, controller):
    n = 3
    results, _ = launch("tests.workers.gather_checks", n, controller, tmp_path, timeout=180)
    expected = [digest(payload(r)) for r in range(n)]
    for r, res in enumerate(results):
        assert (res["rank"], res["size"], res["controller"]) == (r, n, controller)
        assert res["to_0"] == (expected if r == 0 else None)          # the list on root, None elsewhere
        assert res["to_last"] == (expected if r == n - 1 else None)
        assert res["default_name_1"] == (list(range(n)) if r == 0 else None)
        assert res["default_name_2"] == ([10 * q for q in range(n)] if r == 0 else None)
