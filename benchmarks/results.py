"""Turn a pytest-benchmark JSON into a results file ``benchmarks/results/<gpu>-<yyyy-mm-dd>.json``.

    pytest benchmarks/ --benchmark-enable --benchmark-json=raw.json     # on a GPU machine
    python -m benchmarks.results raw.json [more.json ...] [--out-dir DIR] [--overwrite] [--commit SHA]

Also takes the raw file of ``python -m benchmarks.e2e`` (same shape), alone (-> ``<gpu>-<date>-e2e.json``)
or with the day's microbenchmark files. Refuses (exit 1, nothing written) a CPU smoke run, a run
without benchmark data, and any diffaccel case without at least one baseline measured in the same
run. Results file, schema 1:

    {"schema": 1, "device": {"name", "capability", "memory_gib", "driver"}, "torch", "triton", "cuda",
     "diffaccel", "commit", "dirty", "date", "source": [raw file names],
     "cases": [{"family", "case", "shape", "dtype", "impl", "median_ms", "mean_ms", "stddev_ms", "rounds",
                "inner_calls", "flops", "bytes", "tflops", "gbps", "name"[, "peak_memory_bytes", "weight_bytes"]}]}

Times are per call: pytest-benchmark's per-round figures divided by the ``inner_calls`` that
``benchmarks/_util.measure`` ran back to back in each round.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_EXTRA = ("family", "case", "shape", "dtype", "impl")
MEMORY_EXTRA = ("peak_memory_bytes", "weight_bytes")  # recorded where a case measured them (benchmarks/e2e.py)


class ResultsError(ValueError):
    """The raw run cannot become a results file; the message says why."""


def is_ours(impl: str) -> bool:
    return impl == "diffaccel" or impl.startswith("diffaccel:")


def is_baseline(impl: str) -> bool:
    return impl.startswith("baseline:")


def case_key(c: dict) -> tuple:
    return (c["family"], c["case"], c["shape"], c["dtype"])


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ResultsError(f"device name {name!r} gives an empty file name")
    return slug


def _env(raw: dict, source: str) -> dict:
    env = (raw.get("machine_info") or {}).get("diffaccel_env")
    if env is None:
        raise ResultsError(f"{source}: machine_info has no diffaccel_env: not a run of benchmarks/ "
                           "(its conftest.py records the device and versions)")
    return env


def _case_from_bench(bench: dict, source: str) -> dict:
    name = bench.get("fullname") or bench.get("name", "?")
    extra = bench.get("extra_info") or {}
    missing = [k for k in REQUIRED_EXTRA if extra.get(k) in (None, "")]
    if missing:
        raise ResultsError(f"{source}: {name} lacks extra_info {', '.join(missing)} "
                           "(use benchmarks._util.annotate)")
    if extra.get("smoke"):
        raise ResultsError(f"{source}: {name} is a smoke measurement (no CUDA or DIFFACCEL_BENCH_SMOKE=1); "
                           "smoke runs are never recorded")
    if extra.get("outcome") != "passed":
        raise ResultsError(f"{source}: {name} " + (f"{extra['outcome']} its checks after being timed" if
                           extra.get("outcome") else "has no recorded outcome (benchmarks/conftest.py records "
                           "it)") + ": only cases that passed are recorded (--drop-failed leaves it out)")
    impl = extra["impl"]
    if not (is_ours(impl) or is_baseline(impl)):
        raise ResultsError(f"{source}: {name} has impl {impl!r}: expected 'diffaccel[:backend]' or 'baseline:<name>'")
    stats = bench.get("stats") or {}
    if not stats.get("rounds") or any(stats.get(k) is None for k in ("median", "mean", "stddev")):
        raise ResultsError(f"{source}: {name} has no timing data (was it run with --benchmark-disable?)")
    inner = int(extra.get("inner_calls") or 1)
    median_s = stats["median"] / inner
    flops, nbytes = extra.get("flops"), extra.get("bytes")
    return {
        "family": extra["family"], "case": extra["case"], "shape": str(extra["shape"]), "dtype": str(extra["dtype"]),
        "impl": impl,
        "median_ms": median_s * 1e3, "mean_ms": stats["mean"] / inner * 1e3,
        "stddev_ms": stats["stddev"] / inner * 1e3, "rounds": int(stats["rounds"]), "inner_calls": inner,
        "flops": flops, "bytes": nbytes,
        "tflops": flops / median_s / 1e12 if flops else None,
        "gbps": nbytes / median_s / 1e9 if nbytes else None,
        "name": bench.get("name"),
        **{k: int(extra[k]) for k in MEMORY_EXTRA if extra.get(k) is not None},
    }


def convert(raws: Iterable[tuple], commit: Optional[str] = None, drop_unpaired: bool = False,
            drop_failed: bool = False) -> dict:
    """[(source name, pytest-benchmark JSON dict)] -> a results dict (raises ResultsError).
    ``drop_unpaired``: leave out (and list under "dropped") the diffaccel cases whose baselines did
    not run, as when a run was stopped at its time limit, instead of refusing the whole run.
    ``drop_failed``: leave out (and list under "failed") the cases that failed their checks after
    being timed, instead of refusing the run."""
    raws = list(raws)
    if not raws:
        raise ResultsError("no raw benchmark files given")
    envs, cases, commits, dates, failed = [], [], set(), set(), []
    for source, raw in raws:
        env = _env(raw, source)
        if env.get("smoke") or not env.get("device"):
            raise ResultsError(f"{source}: a CPU smoke run (no CUDA device): nothing was measured on a GPU, "
                               "so nothing is recorded")
        if not isinstance(env["device"], dict) or not env["device"].get("name"):
            raise ResultsError(f"{source}: machine_info's device has no name: {env['device']!r}")
        if env.get("triton_interpret"):
            raise ResultsError(f"{source}: ran with TRITON_INTERPRET=1 (Triton kernels in the CPU interpreter): "
                               "unset it and run again")
        if env.get("backend_errors"):  # (files from before this field have none)
            raise ResultsError(f"{source}: diffaccel's kernels were not importable, so its ops ran their torch "
                               f"references: {'; '.join(env['backend_errors'])}. Build first (gpu_session.sh's "
                               "build stage)")
        benches = raw.get("benchmarks") or []
        if not benches:
            raise ResultsError(f"{source}: holds no benchmarks: pass --benchmark-enable "
                               "(pyproject's addopts disable benchmarks) and check that tests ran")
        envs.append((source, env))
        for b in benches:
            outcome = (b.get("extra_info") or {}).get("outcome")
            if drop_failed and outcome not in ("passed", None):
                failed.append(b.get("fullname") or b.get("name", "?"))
                continue
            cases.append(_case_from_bench(b, source))
        info = raw.get("commit_info") or {}
        sha = info.get("id")
        # pytest-benchmark writes 'unversioned' / 'unknown' when git was absent or failed
        commits.add((sha if sha and re.fullmatch(r"[0-9a-f]{7,40}", str(sha)) else None, bool(info.get("dirty"))))
        dates.add(str(raw.get("datetime", ""))[:10])
    first_source, env = envs[0]
    for source, other in envs[1:]:
        for field in ("device", "torch", "triton", "cuda", "diffaccel"):
            if other.get(field) != env.get(field):
                raise ResultsError(f"{source} and {first_source} differ in {field} "
                                   f"({other.get(field)!r} vs {env.get(field)!r}): record them separately")
    if commit is not None and not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        raise ResultsError(f"--commit: expected a git sha, got {commit!r}")
    explicit = commit is not None
    ids = {c for c, _ in commits}
    if len(ids) > 1:  # (--commit corrects a stale sha; it does not join runs of different trees)
        raise ResultsError(f"inputs come from different commits ({sorted(map(str, ids))}): record them separately")
    if commit is None:
        if None in ids:
            raise ResultsError("commit unknown (no git checkout in the run): pass --commit SHA")
        commit = ids.pop()
    # an explicit --commit names the tree that was measured; the raw files' dirty flag then describes
    # whatever checkout the run saw (the device tool's copies carry the session's starting .git)
    dirty = False if explicit else any(d for _, d in commits)
    if len(dates) != 1 or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", next(iter(dates))):
        raise ResultsError(f"inputs carry no single run date ({sorted(dates)})")

    seen = {}
    for c in cases:
        k = case_key(c) + (c["impl"],)
        if k in seen:
            raise ResultsError(f"{c['impl']} measured twice for {'/'.join(case_key(c))} "
                               f"({seen[k]} and {c['name']})")
        seen[k] = c["name"]
    baselines = {case_key(c) for c in cases if is_baseline(c["impl"])}
    lacking = sorted({case_key(c) for c in cases if is_ours(c["impl"]) and case_key(c) not in baselines})
    dropped = []
    if lacking and drop_unpaired:
        dropped = sorted(c["name"] for c in cases if is_ours(c["impl"]) and case_key(c) in lacking)
        cases = [c for c in cases if not (is_ours(c["impl"]) and case_key(c) in lacking)]
        lacking = []
    if lacking:
        listed = "; ".join(" ".join(k) for k in lacking[:10])
        raise ResultsError(f"{len(lacking)} diffaccel case(s) have no baseline measured in the same run: {listed} "
                           "(--drop-unpaired leaves them out)")
    if not any(is_ours(c["impl"]) for c in cases):
        raise ResultsError("no diffaccel measurement to record" + (" after dropping the unpaired ones"
                                                                     if dropped else " (the run holds baselines only)"))

    return {
        "schema": SCHEMA, "device": env["device"], "torch": env.get("torch"), "triton": env.get("triton"),
        "cuda": env.get("cuda"), "diffaccel": env.get("diffaccel"), "commit": commit, "dirty": dirty,
        "date": dates.pop(), "source": [Path(s).name for s, _ in raws],
        "cases": sorted(cases, key=lambda c: case_key(c) + (not is_ours(c["impl"]), c["impl"])),
        **({"dropped": dropped} if dropped else {}),
        **({"failed": failed} if failed else {}),
    }


def results_path(results: dict, out_dir: Path = RESULTS_DIR) -> Path:
    # an end-to-end run alone (its own device call) gets its own file beside the day's microbenchmarks
    e2e_only = all(c["family"] == "e2e" for c in results["cases"])
    return Path(out_dir) / f"{gpu_slug(results['device']['name'])}-{results['date']}{'-e2e' if e2e_only else ''}.json"


def write(results: dict, out_dir: Path = RESULTS_DIR, overwrite: bool = False) -> Path:
    path = results_path(results, out_dir)
    if path.exists() and not overwrite:
        raise ResultsError(f"{path} exists: pass --overwrite to replace it, or give all of the day's raw "
                           "files in one call so they land in one results file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ResultsError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}")
    return data


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__.split("\n\n")[0])
    p.add_argument("raw", nargs="+", help="pytest-benchmark JSON file(s) from one GPU run")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--commit", help="the commit whose tree was measured, when the run had no git checkout or a "
                                    "stale one (its dirty flag is then not used)")
    p.add_argument("--drop-unpaired", action="store_true",
                   help="leave out diffaccel cases whose baselines did not run (a run stopped at its time limit)")
    p.add_argument("--drop-failed", action="store_true",
                   help="leave out cases that failed their checks after being timed (listed in the file)")
    args = p.parse_args(argv)
    try:
        raws = []
        for name in args.raw:
            try:
                raw = json.loads(Path(name).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ResultsError(f"{name}: cannot read a JSON file ({e})") from e
            if not isinstance(raw, dict):
                raise ResultsError(f"{name}: expected a pytest-benchmark JSON object, got a {type(raw).__name__}")
            raws.append((name, raw))
        results = convert(raws, commit=args.commit, drop_unpaired=args.drop_unpaired, drop_failed=args.drop_failed)
        for name in results.get("dropped", []):
            print(f"benchmarks.results: left out (no baseline in this run): {name}", file=sys.stderr)
        for name in results.get("failed", []):
            print(f"benchmarks.results: left out (failed its checks): {name}", file=sys.stderr)
        path = write(results, Path(args.out_dir), overwrite=args.overwrite)
    except ResultsError as e:
        print(f"benchmarks.results: refused: {e}", file=sys.stderr)
        return 1
    n_ours = sum(is_ours(c["impl"]) for c in results["cases"])
    print(f"wrote {path}: {len(results['cases'])} measurements ({n_ours} diffaccel) on {results['device']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
