from wclust.kernels import SPIN_ENV, openmp_env_defaults
from wclust.measure import executors


def test_short_spin_unless_the_user_chose_a_policy():
    assert openmp_env_defaults({}) == SPIN_ENV == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_env_defaults({"OMP_WAIT_POLICY": "PASSIVE"}) == {}
    assert openmp_env_defaults({"GOMP_SPINCOUNT": "0"}) == {}


def test_compare_cells_get_the_spin_default(monkeypatch):
    seen = {}

    class Done:
        returncode, stdout, stderr = 1, "", "stopped here"

    def fake_run(cmd, **kw):
        seen.update(kw["env"])
        return Done()

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(executors.subprocess, "run", fake_run)
    executors.run_cell({})
    assert seen["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in seen
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    executors.run_cell({})
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE"
