"""benchmarks/e2e.py runs end to end on tiny configs (CPU smoke: code path only, nothing recorded)."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "benchmarks" / "e2e.py"
if str(REPO) not in sys.path:  # e2e imports benchmarks._util; appended, so an installed wheel is not shadowed
    sys.path.append(str(REPO))


def _load():
    spec = importlib.util.spec_from_file_location("diffaccel_bench_e2e", E2E)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_e2e_smoke_runs_every_variant():
    e2e = _load()
    cases = e2e.run(["sdxl", "flux"], list(e2e.VARIANTS), batches=(1,), steps=(1,), smoke=True)
    assert {c["impl"] for c in cases} == set(e2e.VARIANTS)
    by = {(c["case"], c["impl"]): c for c in cases}
    # the smoke configs' layers are too narrow for W4A8's groups of 128 (they stay in floating point);
    # memory ratios on real layers are asserted in tests/test_quant_layers.py
    for model in ("sdxl", "flux"):
        fp = by[(f"{model}/steps1/b1", "baseline:diffusers-eager")]["weight_bytes"]
        assert by[(f"{model}/steps1/b1", "diffaccel:attn+w8a8")]["weight_bytes"] < fp
        assert by[(f"{model}/steps1/b1", "diffaccel:attn+w4a8")]["weight_bytes"] <= fp


def test_e2e_refuses_full_size_without_gpu():
    e2e = _load()
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit):
        e2e.main(["--models", "sdxl"])
    with pytest.raises(SystemExit):
        e2e.main(["--smoke", "--models", "sd9"])


def test_e2e_stops_at_the_deadline_and_reports_each_case():
    e2e = _load()
    seen = []
    cases = e2e.run(["sdxl"], list(e2e.VARIANTS)[:2], batches=(1,), steps=(1,), smoke=True,
                    on_case=lambda cs: seen.append(len(cs)))
    assert seen == [1, 2] and len(cases) == 2
    assert e2e.run(["sdxl"], list(e2e.VARIANTS), batches=(1,), steps=(1,), smoke=True, deadline=0) == []
