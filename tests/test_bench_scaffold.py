"""Benchmark scaffolding: pytest-benchmark JSON -> results file (and its refusals), BENCHMARKS.md
rendering with the speedup plot, and the benchmark suite's CPU smoke run."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # appended: an installed diffaccel wheel must not be shadowed by the source tree
    sys.path.append(str(REPO))
from benchmarks import render, results  # noqa: E402

DEVICE = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1, "driver": "580.65"}


def _bench(impl, median_s, *, case="per_token", shape="4096x1280", dtype="fp16", inner=1, flops=None,
           nbytes=None, smoke=False, outcome="passed"):
    return {
        "group": f"quantize/{case}", "name": f"test_{case}[{shape}-{dtype}-{impl}]",
        "fullname": f"benchmarks/bench_quantize.py::test_{case}[{shape}-{dtype}-{impl}]",
        "extra_info": {"family": "quantize", "case": case, "shape": shape, "dtype": dtype, "impl": impl,
                       "flops": flops, "bytes": nbytes, "smoke": smoke, "inner_calls": inner, "outcome": outcome},
        "stats": {"min": median_s, "max": median_s * 1.2, "mean": median_s * 1.05, "stddev": median_s * 0.01,
                  "rounds": 30, "median": median_s, "iterations": 1},
    }


def _raw(benches, *, device=DEVICE, smoke=False, commit="0123456789abcdef0123456789abcdef01234567"):
    return {
        "machine_info": {"node": "gpu-box", "diffaccel_env": {
            "smoke": smoke, "device": device, "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
            "diffaccel": "0.1.0"}},
        "commit_info": {"id": commit, "dirty": False},
        "benchmarks": benches,
        "datetime": "2026-11-22T03:04:05.123456+00:00",
        "version": "5.2.3",
    }


GOOD = [
    # 10 back-to-back calls per round: 0.5 ms a round is 0.05 ms a call
    _bench("diffaccel:triton", 0.5e-3, inner=10, nbytes=2_000_000),
    _bench("baseline:torch-eager", 2.0e-4, nbytes=2_000_000),
    _bench("baseline:torch-compile", 1.0e-4, nbytes=2_000_000),
    _bench("diffaccel:cuda", 4.0e-5, nbytes=2_000_000, case="per_tensor"),
    _bench("baseline:torch-eager", 1.2e-4, nbytes=2_000_000, case="per_tensor"),
]


def test_convert_good_run(tmp_path):
    res = results.convert([("raw.json", _raw(GOOD))])
    assert res["schema"] == 1 and res["device"] == DEVICE and res["torch"] == "2.11.0+cu130"
    assert res["commit"].startswith("0123456") and res["date"] == "2026-11-22" and res["dirty"] is False
    by = {(c["case"], c["impl"]): c for c in res["cases"]}
    ours = by[("per_token", "diffaccel:triton")]
    assert ours["median_ms"] == pytest.approx(0.05) and ours["inner_calls"] == 10
    assert ours["gbps"] == pytest.approx(2_000_000 / 0.05e-3 / 1e9) and ours["tflops"] is None
    assert by[("per_token", "baseline:torch-eager")]["median_ms"] == pytest.approx(0.2)
    path = results.write(res, tmp_path)
    assert path.name == "nvidia-h100-80gb-hbm3-2026-11-22.json"
    assert results.load(path) == json.loads(json.dumps(res))
    with pytest.raises(results.ResultsError, match="exists"):
        results.write(res, tmp_path)
    results.write(res, tmp_path, overwrite=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["machine_info"]["diffaccel_env"].update(smoke=True), "smoke run"),
    (lambda r: r["machine_info"]["diffaccel_env"].update(device=None), "smoke run"),
    (lambda r: r["benchmarks"][0]["extra_info"].update(smoke=True), "smoke measurement"),
    (lambda r: r.update(benchmarks=[]), "--benchmark-enable"),
    (lambda r: r["machine_info"].pop("diffaccel_env"), "not a run of benchmarks/"),
    (lambda r: r["benchmarks"][0]["extra_info"].pop("shape"), "lacks extra_info shape"),
    (lambda r: r["benchmarks"][0]["extra_info"].update(impl="mine"), "impl 'mine'"),
    (lambda r: r["benchmarks"][0].update(stats={}), "no timing data"),
    # the per_tensor baseline measured at another shape does not count for the diffaccel case
    (lambda r: r["benchmarks"][4]["extra_info"].update(shape="4096x320"), "no baseline measured in the same run"),
    (lambda r: r["benchmarks"].append(copy.deepcopy(r["benchmarks"][0])), "measured twice"),
    (lambda r: r["commit_info"].update(id=None), "--commit"),
    (lambda r: r["commit_info"].update(id="unversioned"), "--commit"),
    # a case that failed its output check after measure() kept its timing in pytest-benchmark's JSON
    (lambda r: r["benchmarks"][0]["extra_info"].update(outcome="failed"), "failed its checks after being timed"),
    (lambda r: r["benchmarks"][0]["extra_info"].pop("outcome"), "no recorded outcome"),
    # a GPU run with an inherited TRITON_INTERPRET=1 timed the interpreter
    (lambda r: r["machine_info"]["diffaccel_env"].update(triton_interpret=True), "TRITON_INTERPRET=1"),
    # a never-built source tree on a bare machine: every op ran its torch reference
    (lambda r: r["machine_info"]["diffaccel_env"].update(
        backend_errors=["diffaccel._C not importable: No module named 'diffaccel._C'"]),
     r"kernels were not importable, so its ops ran their torch references: diffaccel._C not importable"),
    (lambda r: r["machine_info"]["diffaccel_env"].update(device={"capability": "9.0"}), "device has no name"),
])
def test_convert_refusals(mutate, message):
    raw = _raw(copy.deepcopy(GOOD))
    mutate(raw)
    with pytest.raises(results.ResultsError, match=message):
        results.convert([("raw.json", raw)])


def test_drop_unpaired_leaves_out_cases_whose_baselines_did_not_run():
    raw = _raw(copy.deepcopy(GOOD))
    del raw["benchmarks"][4]  # the run stopped before per_tensor's baseline
    with pytest.raises(results.ResultsError, match="--drop-unpaired"):
        results.convert([("raw.json", raw)])
    res = results.convert([("raw.json", raw)], drop_unpaired=True)
    assert res["dropped"] == ["test_per_tensor[4096x1280-fp16-diffaccel:cuda]"]
    assert {(c["case"], c["impl"]) for c in res["cases"]} == {
        ("per_token", "diffaccel:triton"), ("per_token", "baseline:torch-eager"),
        ("per_token", "baseline:torch-compile")}
    assert "dropped" not in results.convert([("raw.json", _raw(copy.deepcopy(GOOD)))], drop_unpaired=True)
    only_ours = _raw([_bench("diffaccel:triton", 1e-4)])
    with pytest.raises(results.ResultsError, match="baselines only|no diffaccel"):
        results.convert([("raw.json", only_ours)], drop_unpaired=True)


def test_commit_given_by_hand():
    raw = _raw(copy.deepcopy(GOOD), commit="unversioned")
    assert results.convert([("raw.json", raw)], commit="abcdef1")["commit"] == "abcdef1"
    with pytest.raises(results.ResultsError, match="--commit: expected a git sha"):
        results.convert([("raw.json", raw)], commit="HEAD")
    # --commit corrects a stale sha; it does not join runs made from different trees (it used to)
    a, b = _raw(copy.deepcopy(GOOD[:3]), commit="1111111"), _raw(copy.deepcopy(GOOD[3:]), commit="2222222")
    with pytest.raises(results.ResultsError, match="different commits"):
        results.convert([("a.json", a), ("b.json", b)], commit="abcdef1")


def test_drop_failed_lists_the_cases_it_leaves_out():
    raw = _raw(copy.deepcopy(GOOD))
    raw["benchmarks"][3]["extra_info"]["outcome"] = "failed"
    res = results.convert([("raw.json", raw)], drop_failed=True)
    assert res["failed"] == ["benchmarks/bench_quantize.py::test_per_tensor[4096x1280-fp16-diffaccel:cuda]"]
    assert ("per_tensor", "diffaccel:cuda") not in {(c["case"], c["impl"]) for c in res["cases"]}


def test_convert_refuses_mixed_devices():
    other = _raw(copy.deepcopy(GOOD), device=dict(DEVICE, name="NVIDIA A100-SXM4-80GB"))
    with pytest.raises(results.ResultsError, match="differ in device"):
        results.convert([("a.json", _raw(GOOD)), ("b.json", other)])


def test_cli_refuses_smoke_and_writes_nothing(tmp_path, capsys):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(_raw(GOOD, smoke=True)))
    out = tmp_path / "results"
    assert results.main([str(raw), "--out-dir", str(out)]) == 1
    assert "refused" in capsys.readouterr().err
    assert not out.exists()
    raw.write_text(json.dumps(_raw(GOOD)))
    assert results.main([str(raw), "--out-dir", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["nvidia-h100-80gb-hbm3-2026-11-22.json"]


PROSE = "# Benchmarks\n\nHow to run.\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nMore prose.\n"


def test_render_tables_and_plot(tmp_path):
    rdir = tmp_path / "results"
    results.write(results.convert([("raw.json", _raw(GOOD))]), rdir)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(PROSE)
    text = render.render(rdir, md)
    assert text.startswith("# Benchmarks\n\nHow to run.\n\n") and text.endswith("\n\nMore prose.\n")
    assert "old table" not in text
    assert "### NVIDIA H100 80GB HBM3 (sm_90) — 2026-11-22" in text and "2.11.0+cu130" in text and "`0123456789`" in text
    assert "| case | shape | dtype | impl | ours ms | torch-compile ms | torch-eager ms |" in text
    row = next(line for line in text.splitlines() if line.startswith("| per_token | 4096x1280 | fp16 | diffaccel:triton"))
    assert "2.00×" in row and "4.00×" in row and "| 40 |" in row  # vs compile 0.1/0.05, vs eager 0.2/0.05; 40 GB/s
    png = rdir / "speedup-nvidia-h100-80gb-hbm3-2026-11-22.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](results/speedup-nvidia-h100-80gb-hbm3-2026-11-22.png)" in text
    assert render.render(rdir, md) == text  # idempotent


def test_render_without_results_and_bad_markers(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(PROSE)
    (tmp_path / "empty").mkdir()
    text = render.render(tmp_path / "empty", md)
    assert f"{render.BEGIN}\n{render.EMPTY}\n{render.END}" in text and "More prose." in text
    md.write_text("# Benchmarks\nno markers\n")
    with pytest.raises(results.ResultsError, match="results:begin"):
        render.render(tmp_path / "empty", md)
    # a mistyped --results-dir used to render "no measurements" over the committed tables
    with pytest.raises(SystemExit, match="is not a directory"):
        render.render(tmp_path / "missing", md)
    (tmp_path / "empty" / "cut.json").write_text('{"schema": 1, "cases": [')  # a run killed mid-write
    with pytest.raises(SystemExit, match="cut.json is not valid JSON"):
        render.render(tmp_path / "empty", md)


def _pytest(args, tmp_path):
    # PYTEST_*: under pytest-xdist the worker's variables make the child's pytest-benchmark act as a worker
    # and skip writing its JSON
    env = {k: v for k, v in os.environ.items()
           if k not in ("DIFFACCEL_BACKEND", "DIFFACCEL_DISABLE") and not k.startswith("PYTEST_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    # `python -m` would put the repo root (whose diffaccel/ has no compiled _C) ahead of the installed wheel
    env["PYTHONSAFEPATH"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_benchmark_suite_collects():
    proc = _pytest(["benchmarks/", "-q", "--collect-only"], None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench_quantize.py::test_quantize_per_token" in proc.stdout


def test_quantize_smoke_run_is_recorded_as_smoke_and_refused(tmp_path):
    raw = tmp_path / "raw.json"
    proc = _pytest(["benchmarks/bench_quantize.py", "-q", "-x", "--benchmark-enable", f"--benchmark-json={raw}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(raw.read_text())
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert {"diffaccel:triton", "baseline:torch-eager"} <= impls
    assert all(b["group"].startswith("quantize/") and b["extra_info"]["bytes"] > 0 for b in data["benchmarks"])
    assert data["machine_info"]["diffaccel_env"]["smoke"] is True
    assert {b["extra_info"].get("outcome") for b in data["benchmarks"]} == {"passed"}  # (conftest records it)
    with pytest.raises(results.ResultsError, match="smoke run"):
        results.convert([(str(raw), data)])


def test_render_ignores_other_json_in_results(tmp_path):
    """benchmarks/results/ also holds the quality benchmark's JSON (another schema): not a speed table."""
    (tmp_path / "quality-cpu-2026-01-01.json").write_text(json.dumps({"meta": {}, "results": []}))
    assert render.render_section(tmp_path, tmp_path / "BENCHMARKS.md", plots=False) == render.EMPTY


def test_pytest_deadline_stops_cleanly_with_reports(tmp_path):
    """DIFFACCEL_PYTEST_DEADLINE (set by benchmarks/gpu_session.sh): once passed, no new test starts,
    and the session still ends normally, so the junit report of what ran is written."""
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, DIFFACCEL_PYTEST_DEADLINE="0")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "refusals",
                          f"--junitxml={junit}", str(REPO / "tests" / "test_bench_scaffold.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "DIFFACCEL_PYTEST_DEADLINE passed" in out.stdout, out.stdout[-2000:]
    assert "1 passed" in out.stdout
    assert 'tests="1"' in junit.read_text()


def test_gemm_configs_checks_each_candidate_on_cpu(monkeypatch):
    """benchmarks/gemm_configs.py's phase-1 check, on tiny shapes in Triton's interpreter: every
    candidate tile of every family passes (bit-exact int8 / W4A8, fp8 within the bound), and a
    corrupted kernel output is caught."""
    from benchmarks import gemm_configs as gc

    from diffaccel.ops import _backend

    if _backend._why_not(_backend.registered_ops()["int8_act_gemm"], "triton", __import__("torch").device("cpu")):
        pytest.skip("Triton interpreter unavailable")
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    monkeypatch.setattr(gc, "M", 40)
    monkeypatch.setattr(gc, "SHAPES", {"tiny": (48, 256)})
    for family, configs in gc.CANDIDATES.items():
        for bm, bn, bk, w, s in configs[:2]:
            small = (min(bm, 32), min(bn, 32), bk, 4, 1)  # the interpreter's time grows with the tile
            assert gc.check(family, small)["ok"], (family, small)
    real = gc._launcher

    def corrupt(*a, **k):
        launch = real(*a, **k)
        out = a[5]
        return lambda: (launch(), out.view(-1)[0].add_(1.0))
    monkeypatch.setattr(gc, "_launcher", corrupt)
    assert not gc.check("int8", (32, 32, 64, 4, 1))["ok"]


def test_host_overhead_times_every_case_both_ways_and_restores_launches():
    """benchmarks/host_overhead.py on CPU: every case runs with the launches stubbed, in both modes;
    afterwards Triton launches and the value checks are the real ones again."""
    from benchmarks import host_overhead as ho
    from triton.runtime.interpreter import InterpretedFunction

    from diffaccel.ops import _checks

    real_run, real_check = InterpretedFunction.run, _checks.values_readable
    rows = ho.run(list(ho.CASES), calls=2, rounds=1)
    assert {(r["case"], r["mode"]) for r in rows} == {(c, m) for c in ho.CASES for m in ("direct", "dispatcher")}
    assert all(r["median_us"] > 0 for r in rows)
    assert InterpretedFunction.run is real_run and _checks.values_readable is real_check
    table = ho.markdown(rows)
    assert table.count("\n") == len(ho.CASES) + 1 and "direct us/call" in table


def test_host_overhead_gpu_mode_code_runs_on_cpu():
    """The --gpu measurement's code path (backend rows, the three figures, the table), run on CPU
    tensors: the automatic choice there is the reference, so each case gets a Triton-forced row too."""
    from benchmarks import host_overhead as ho

    names = ["w8a8-linear-M16", "solver-dpm2m-cfg"]
    rows = ho.run_gpu(names, calls=1, rounds=1, device="cpu", warmup=1)
    assert [(r["case"], r["mode"], r["backend"]) for r in rows] == [
        (n, m, b) for n in names for m, b in (("auto", "torch"), ("triton-forced", "triton"))]
    assert all(r[k] > 0 for r in rows for k in ("python_us", "host_us", "wall_us"))
    assert ho.markdown_gpu(rows).count("\n") == len(rows) + 1
    assert set(ho.CASE_OPS) == set(ho.CASES) | set(ho.GPU_ONLY_CASES)
    assert ho._int8_gemm_codes(8, 32, 48)().shape == (8, 32)  # the GPU-only case's call, small


def test_gpu_session_refuses_unknown_stages_and_exits_nonzero_when_a_stage_fails(tmp_path):
    """A typo in STAGES ("bnech", "build,bench") ran nothing and exited 0; failed stages ended in
    exit 0 too. Here the host stage fails (no GPU), and the last line still reaches session.log."""
    script = str(REPO / "benchmarks" / "gpu_session.sh")
    # The script runs python3: this interpreter, behind a wrapper that answers the built-check a call
    # without the build stage makes (from the repo root, diffaccel is the source tree, which holds no
    # _C in CI: it installs a wheel), so that the host stage runs and fails here for want of a GPU.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = "-c" ] && [ "$2" = "import diffaccel._C, diffaccel.kernels" ]; '
                       f'then exit 0; fi\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    env = dict(os.environ, OUT=str(tmp_path / "out dir"), STAGES="build,bench", PATH=path)
    proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "STAGES: unknown stage 'build,bench'" in proc.stdout
    env.update(STAGES="configs gemmcfg gpu bench host e2e")  # more files than the device tool returns
    proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "STAGES: 6 stages besides build write more files" in proc.stdout
    env.update(STAGES="host", TOTAL_LIMIT="100", LIMIT_HOST="60")
    proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert (tmp_path / "out dir" / "session.log").read_text().rstrip().endswith("failed: host")


def test_gpu_session_without_build_stops_where_diffaccel_is_not_built(tmp_path):
    """A later call on a bare machine without the build stage imported diffaccel from the source tree,
    where _C and diffaccel.kernels are missing: every op ran its torch reference, and the e2e timings
    of the reference were recorded as diffaccel's. Here python3 cannot import them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), STAGES="e2e",
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "diffaccel is not built on this machine (a bare one): add build to STAGES" in proc.stdout
    assert "== e2e" not in proc.stdout


def test_gpu_session_checks_its_file_lists_before_building(tmp_path):
    """A misspelt GPU_FILES entry was found only when the gpu stage started, after build had spent
    about four minutes of device time; BENCH_FILES only when pytest ran. Both stop it before anything
    runs now (exit 2: no env.txt, no build)."""
    script = str(REPO / "benchmarks" / "gpu_session.sh")
    for var, value, said in (("GPU_FILES", "tests/test_gemm_ops.py tests/test_nope.py", "no file tests/test_nope.py"),
                             ("GPU_FILES", " ", "empty"),
                             ("BENCH_FILES", "benchmarks/bench_gemm.py benchmarks/bench_gem.py",
                              "no file benchmarks/bench_gem.py")):
        out = tmp_path / f"out-{var}-{len(value)}"
        env = dict(os.environ, OUT=str(out), STAGES="build gpu bench", **{var: value})
        proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert f"{var}: {said}" in proc.stdout
        assert not (out / "env.txt").exists() and not (out / "build.log").exists()


def test_a_partial_quality_run_leaves_the_committed_table_alone():
    """The documented quick command (one model, one method) replaced the whole quality table in
    BENCHMARKS.md (42 rows -> 2) and wrote a results file; it now prints and writes nothing
    without --write. Also: counts of 0 are refused at the command line (e2e --reps, host_overhead
    --calls / --rounds, quality --samples)."""
    before = (REPO / "BENCHMARKS.md").read_text()
    results_before = sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run([sys.executable, "benchmarks/quality.py", "--models", "unet", "--methods", "preset",
                           "--bits", "W8A8", "--samples", "2", "--steps", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a partial run: BENCHMARKS.md and benchmarks/results/ left alone" in proc.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before
    assert sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir()) == results_before
    proc = subprocess.run([sys.executable, "benchmarks/quality.py", "--samples", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--samples: expected a positive int, got 0" in proc.stderr
    from benchmarks import e2e, host_overhead

    for module, flag in ((e2e, "--reps"), (host_overhead, "--calls"), (host_overhead, "--rounds")):
        with pytest.raises(SystemExit) as exit_info:
            module.main([flag, "0"])
        assert exit_info.value.code == 2


def _deadline(monkeypatch, value):
    """Set the stage deadline for this process only. Not through the environment: the conftests'
    teardown hooks read it before monkeypatch restores it, and would stop the whole session."""
    from benchmarks import _util

    monkeypatch.setattr(_util, "stage_deadline", lambda: value)


def test_run_in_child_keeps_within_the_stage_deadline(monkeypatch):
    """A child gets at most the time left before gpu_session.sh's stage deadline (its own timeout of
    240-600 s outlived the 150-240 s stage, which was then killed with nothing written), and none
    starts once the deadline has passed."""
    import time

    from benchmarks import _util

    _deadline(monkeypatch, time.time() + 3)
    t0 = time.time()
    res, err = _util.run_in_child("time", "sleep", (30,), 600)
    assert res is None and err.startswith("timed out after") and time.time() - t0 < 15, err
    _deadline(monkeypatch, 0.0)
    assert _util.run_in_child("time", "sleep", (30,), 600) == (
        None, f"not run: the stage deadline ({_util.DEADLINE_ENV}) had passed")
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setenv(_util.DEADLINE_ENV, "soon")
        with pytest.raises(ValueError, match="DIFFACCEL_PYTEST_DEADLINE: expected a unix time"):
            _util.past_deadline()
        m.setenv(_util.DEADLINE_ENV, "0")
        assert _util.past_deadline()


def test_attention_configs_saves_each_case_and_records_those_not_run(tmp_path, monkeypatch):
    """benchmarks/attention_configs.py rewrites --out after every case (a stage killed at its limit
    used to leave no file), and under a passed stage deadline records the cases it did not start
    as not run and exits 1."""
    from benchmarks import _util, attention_configs as ac

    out = tmp_path / "configs.json"
    seen = []

    def fake_run(case):  # one job: the file holds every earlier case when the next one starts
        seen.append(len(json.loads(out.read_text())) if out.exists() else 0)
        if len(seen) == 3:
            _deadline(monkeypatch, 0.0)
        if _util.past_deadline():
            return {"path": case[0], "config": list(case[1]), "head_dim": case[2], "pruned": case[3], "ok": None,
                    "error": "not run"}
        return {"path": case[0], "config": list(case[1]), "head_dim": case[2], "pruned": case[3], "ok": True,
                "rel_l2": 0.0}

    real_run = ac._run
    monkeypatch.setattr(ac, "_run", fake_run)
    monkeypatch.setattr(ac, "_cases", lambda: [("fp16", (64, 64, 4, 2), D, False) for D in (32, 64, 128, 256)])
    _deadline(monkeypatch, None)
    assert ac.main(["--out", str(out), "--jobs", "1"]) == 1
    assert seen == [0, 1, 2, 3]
    rows = json.loads(out.read_text())
    assert [r["ok"] for r in rows] == [True, True, None, None]
    # the real case runner under a passed deadline starts no child
    assert real_run(("fp16", (64, 64, 4, 2), 64, False))["ok"] is None


def test_gemm_configs_under_a_passed_deadline_writes_what_it_has(tmp_path, monkeypatch):
    """benchmarks/gemm_configs.py: no check or timing starts after the stage deadline; the JSON is
    written anyway (it used to be written only at the very end), and the exit status says 1."""
    from benchmarks import gemm_configs as gc

    _deadline(monkeypatch, 0.0)
    out = tmp_path / "gemm.json"
    assert gc.main(["--out", str(out), "--families", "int8", "--jobs", "2"]) == 1
    report = json.loads(out.read_text())
    assert len(report["checks"]) == len(gc.CANDIDATES["int8"])
    assert all(c["ok"] is None and c["error"].startswith("not run") for c in report["checks"])
    assert report["times"] == {} and report["not_timed"] == []


def test_host_overhead_gpu_rows_are_saved_as_they_come_and_stop_at_the_deadline(monkeypatch):
    import time

    from benchmarks import host_overhead as ho

    names = ["w8a8-linear-M16", "solver-dpm2m-cfg"]
    saved = []
    _deadline(monkeypatch, time.time() + 3600)
    rows = ho.run_gpu(names, calls=1, rounds=1, device="cpu", warmup=1, on_row=lambda r: saved.append(len(r)))
    assert saved == [1, 2, 3, 4] and len(rows) == 4
    _deadline(monkeypatch, 0.0)
    assert ho.run_gpu(names, calls=1, rounds=1, device="cpu", warmup=1) == []
