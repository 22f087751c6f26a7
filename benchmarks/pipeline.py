"""Time and memory of `dvc repro` on a fresh clone, and of a no-op `dvc repro`.

    python benchmarks/pipeline.py [--quick] [--keep] [--noop-repeats N]
    python benchmarks/pipeline.py --clone DIR   # only the no-op timings, on a clone already reproduced

Clones the committed main of this repo into a temp dir (a fresh clone: no outputs,
no DVC cache, no MLflow store), runs `dvc repro` while sampling the summed RSS of
the whole process tree, then times no-op `dvc repro` runs against `dvc version`
(the floor of any DVC command: interpreter start and imports) run side by side.
--quick shrinks the params (tiny model, few steps) to check the harness itself.
The machine is shared, so the no-op figures are medians of interleaved runs, as wall time and
as CPU time of the child (user + sys, less sensitive to other load). `yaml_c_loader` says whether
ruamel.yaml's libyaml loader is installed: DVC parses dvc.yaml, dvc.lock and params.yaml several
times per command, and without it that parsing is most of a no-op repro's own time.
The repo's .dvc/config sets core.check_update=false: otherwise every `dvc version` spawns DVC's
updater daemon (a second DVC process), which runs on into the next timed repro.
Two more floors run interleaved with it: a no-op repro of an empty two-stage pipeline (a fresh git
+ DVC repo whose stages copy one small file), which is what DVC costs before our stages add
anything, and the same no-op repro of our pipeline through the `dvc` found on PATH.
`dvc` itself is the console script installed next to this interpreter, as in a virtualenv: on
this machine the `dvc` on PATH is a pyenv shim, a bash script that execs pyenv to pick the
interpreter (about 0.15 s per command), which a venv user does not pay.
DVC's own start-up scans the entry points of every installed distribution several times (fsspec,
networkx backends, DVC plugins), so `installed_distributions` is reported too.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_sampled(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """Run cmd; return (wall seconds, peak RSS of its process tree in bytes, combined output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    watched = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, _tree_rss(watched))
            except psutil.Error:
                pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(output[-6000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return elapsed, peak, output


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Run cmd; return (wall seconds, CPU seconds of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def dvc_command() -> str:
    """The `dvc` console script of this interpreter's environment, else whatever PATH finds."""
    script = Path(sys.executable).parent / "dvc"
    return str(script) if script.is_file() else "dvc"


def empty_pipeline(root: Path, *, dvc: str, env: dict[str, str]) -> Path:
    """A git + DVC repo with two trivial chained stages, reproduced once."""
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  one:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n"
        "  two:\n    cmd: cp b.txt c.txt\n    deps: [b.txt]\n    outs: [c.txt]\n"
    )
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "core.check_update", "false"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    subprocess.run([dvc, "repro"], cwd=root, env=env, check=True, capture_output=True)
    return root


def installed_distributions() -> int:
    from importlib.metadata import distributions

    return sum(1 for _ in distributions())


def yaml_c_loader() -> bool:
    try:
        from ruamel.yaml.main import CParser
    except ImportError:
        return False
    return CParser is not None


def shrink(params_file: Path) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["profiles"]["cpu"].update(model_preset="tiny", max_steps=10)
    params["model"]["block_size"] = 64
    params["tune"].update(n_trials=2, max_epochs=1)
    params["finetune"].update(max_epochs=1, max_length=64)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny params: checks the harness, not the budget"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp clone and print its path")
    parser.add_argument("--noop-repeats", type=int, default=7)
    parser.add_argument(
        "--clone", type=Path, help="time no-op repros in this already-reproduced clone; skip the fresh run"
    )
    args = parser.parse_args()

    dvc = dvc_command()
    workdir = Path(tempfile.mkdtemp(prefix="bigmodel-ops-pipeline-"))
    if args.clone:
        clone = args.clone.resolve()
    else:
        clone = workdir / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        if args.quick:
            shrink(clone / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = str(clone)

    repro_s = peak_rss = stages_ran = None
    if not args.clone:
        repro_s, peak_rss, output = run_sampled([dvc, "repro"], cwd=clone, env=env)
        stages_ran = output.count("Running stage '")
    empty = empty_pipeline(workdir / "empty", dvc=dvc, env=env)

    noop, floor, empty_noop, via_path = [], [], [], []
    for _ in range(args.noop_repeats):  # interleaved so machine noise hits all alike
        noop.append(timed([dvc, "repro"], cwd=clone, env=env))
        floor.append(timed([dvc, "version"], cwd=clone, env=env))
        empty_noop.append(timed([dvc, "repro"], cwd=empty, env=env))
        via_path.append(timed(["dvc", "repro"], cwd=clone, env=env))
    # A "no-op" that ran a stage would time the wrong thing.
    noop_ran = sum(out.count("Running stage '") for _, _, out in noop + empty_noop + via_path)
    noop_s, floor_s, empty_s, path_s = (
        statistics.median(wall for wall, _, _ in runs) for runs in (noop, floor, empty_noop, via_path)
    )
    noop_cpu, floor_cpu, empty_cpu = (
        statistics.median(cpu for _, cpu, _ in runs) for runs in (noop, floor, empty_noop)
    )

    evaluate = json.loads((clone / "outputs/metrics/evaluate.json").read_text())
    result = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "cores": os.cpu_count(),
        "stages_ran": stages_ran,
        "fresh_repro_s": None if repro_s is None else round(repro_s, 1),
        "fresh_repro_budget_s": 600,
        "peak_rss_gb": None if peak_rss is None else round(peak_rss / 1e9, 2),
        "peak_rss_budget_gb": 4.0,
        "noop_repeats": args.noop_repeats,
        "noop_stages_ran": noop_ran,
        "dvc_command": dvc,
        "noop_repro_s": round(noop_s, 3),
        "noop_repro_budget_s": 1.5,
        "dvc_version_floor_s": round(floor_s, 3),
        "empty_pipeline_noop_s": round(empty_s, 3),
        "noop_repro_via_path_dvc_s": round(path_s, 3),
        "noop_vs_floor_ratio": round(noop_s / floor_s, 2),
        "noop_minus_empty_pipeline_s": round(noop_s - empty_s, 3),
        "noop_repro_cpu_s": round(noop_cpu, 3),
        "dvc_version_floor_cpu_s": round(floor_cpu, 3),
        "empty_pipeline_noop_cpu_s": round(empty_cpu, 3),
        "installed_distributions": installed_distributions(),
        "yaml_c_loader": yaml_c_loader(),
        "test_accuracy": evaluate.get("test_acc"),
    }
    if args.keep:
        print(f"clone kept at {clone}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
