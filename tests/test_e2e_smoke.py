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


GPU_ENV = {"smoke": False, "device": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1,
                                      "driver": "580.65"},
           "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0", "diffaccel": "0.1.0",
           "triton_interpret": False}


def test_e2e_raw_file_goes_through_results_and_renders_memory(tmp_path):
    """e2e's raw file is checked and recorded by benchmarks/results.py like the microbenchmarks'
    (it used to write a results file itself: with the device's stale commit, and unchecked), and
    the rendered table carries the weight memory, its ratio to the baseline's, and the peak."""
    from benchmarks import render, results

    e2e = _load()
    cases = e2e.run(["sdxl"], ["baseline:diffusers-eager", "diffaccel:attn+w8a8"], batches=(1,), steps=(1,),
                    smoke=True, reps=2)
    for c in cases:  # a smoke run has no CUDA peak; a GPU run records one
        c["peak_memory_bytes"] = 3 * 2**30
    sha = "0123456789abcdef0123456789abcdef01234567"
    raw = e2e.raw_document(cases, GPU_ENV, "fedcba9876543210fedcba9876543210fedcba98", True,
                           "2026-12-07T01:02:03+00:00")
    rec = results.convert([("e2e.json", raw)], commit=sha)
    assert rec["commit"] == sha and rec["dirty"] is False and rec["date"] == "2026-12-07"
    by = {c["impl"]: c for c in rec["cases"]}
    assert by["diffaccel:attn+w8a8"]["median_ms"] == pytest.approx(cases[1]["median_ms"])
    assert by["diffaccel:attn+w8a8"]["weight_bytes"] == cases[1]["weight_bytes"] < cases[0]["weight_bytes"]
    path = results.write(rec, tmp_path)
    assert path.name == "nvidia-h100-80gb-hbm3-2026-12-07-e2e.json"
    table = "\n".join(render.family_table(render.comparison_rows(results.load(path))["e2e"]))
    ratio = cases[1]["weight_bytes"] / cases[0]["weight_bytes"]
    assert "weights ÷ diffusers-eager" in table and f"{ratio:.2f}×" in table and "| 3.00 |" in table

    # the same checks as the microbenchmarks': a smoke run, the interpreter, an unpaired variant
    with pytest.raises(results.ResultsError, match="smoke run"):
        results.convert([("e2e.json", e2e.raw_document(cases, dict(GPU_ENV, smoke=True), sha, False,
                                                       "2026-12-07T01:02:03+00:00"))])
    with pytest.raises(results.ResultsError, match="TRITON_INTERPRET"):
        results.convert([("e2e.json", e2e.raw_document(cases, dict(GPU_ENV, triton_interpret=True), sha, False,
                                                       "2026-12-07T01:02:03+00:00"))])
    with pytest.raises(results.ResultsError, match="no baseline"):
        results.convert([("e2e.json", e2e.raw_document(cases[1:], GPU_ENV, sha, False, "2026-12-07T01:02:03+00:00"))])
