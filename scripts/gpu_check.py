"""jobwrap on a real GPU: bit-exact preempt-and-resume, GPU checkpoints resumed on GPU and CPU, GPU ratios.

Run through ``scripts/gpu-check`` on a machine with one GPU (about 8 minutes at most);
it needs only python3 with a CUDA torch (2.4 or newer), psutil, xxhash and numpy
(usually installed with torch), and takes jobwrap from the checkout. Results go
to one directory: ``results.json`` and ``results.md``. ``--report-only DIR`` writes them into the GPU section of
docs/benchmarks.md. ``--cpu-dry-run`` runs the same code with the CPU in place
of CUDA and small sizes (the test suite runs it, so the script stays ready).

  demo      examples/train.py on cuda:0 with torch.use_deterministic_algorithms(True), preempted with
            real signals under `jobwrap run`, against the uninterrupted run: final state bit for bit
            (CUDA RNG streams included)
  resume    a checkpoint written from GPU memory, resumed onto the GPU and onto the CPU
  ratios    the pause of a periodic save of a multi-GB GPU state against a blocking torch.save; the
            emergency save against a raw write of the same bytes; a resume onto the GPU against a
            raw read plus a host-to-device copy (medians of the same run, via scripts/benchmarks)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks import common, pause, report, save  # noqa: E402  (scripts/benchmarks: the measuring helpers)

import jobwrap  # noqa: E402
from jobwrap.testing import assert_same_run, final_state, run_preempted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"
STEPS_PER_EPOCH = 16  # train.py: 512 samples / batch 32
GPU_TARGETS = {"periodic pause / blocking torch.save (GPU state)": 0.01,
               "emergency save / raw write (GPU state)": 1.15,
               "resume onto the GPU / raw read + host-to-device copy": 1.30}


def log(message: str) -> None:
    print(f"gpu-check: {message}", flush=True)


# ---------------------------------------------------------------- 1. the demo on the GPU

def check_demo(out: Path, device: str) -> dict[str, Any]:
    """The uninterrupted run and the preempted one side by side; identical final checkpoints?"""
    command = [sys.executable, str(TRAIN), "--epochs", "2", "--deterministic"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "JOBWRAP_DEVICE": device}
    preempt_at = [5, STEPS_PER_EPOCH + 7]
    # fresh=True: a second gpu-check in the same --out must train both runs again, not resume the first's
    # finished runs (never signalled, they would compare the first check's results with themselves).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two processes on one GPU: half the wall time
        plain = pool.submit(run_preempted, command, out / "demo-plain", env=env, fresh=True, timeout=240)
        cut = pool.submit(run_preempted, command, out / "demo-preempted", env=env, preempt_at=preempt_at,
                          fresh=True, timeout=240)
        plain_run, cut_run = plain.result().check(), cut.result().check()
    result: dict[str, Any] = {"preempted_at": cut_run.signalled_at, "device": device}
    try:
        assert_same_run(plain_run.directory, cut_run.directory)
        result["identical"] = True
    except AssertionError as exc:
        result["identical"], result["difference"] = False, str(exc)[:2000]
    rng = final_state(cut_run.directory)["jobwrap"]["ranks"][0]["rng"]
    result["cuda_rng_devices"] = len(rng.get("cuda", []))
    result["ok"] = (result["identical"] and len(cut_run.signalled_at) == len(preempt_at)
                    and (device == "cpu" or result["cuda_rng_devices"] > 0))
    return result


# ---------------------------------------------------------------- 2. a GPU checkpoint, resumed on GPU and CPU

def check_resume(out: Path, device: str) -> dict[str, Any]:
    """Saved from ``device`` memory; resumed with JOBWRAP_DEVICE on the device and on the CPU: same tensors."""
    model, optimizer = common.build(8 << 20, device)
    directory = out / "resume-check"
    shutil.rmtree(directory, ignore_errors=True)  # an earlier check's checkpoint would be resumed into `model`
    with jobwrap.Session(str(directory), environ={}, run_id="gpu-check", save_at_end=False, device=device) as job:
        job.track(model=model, optimizer=optimizer)
        path = job.save().path
    result: dict[str, Any] = {"saved_locations": sorted(_locations(path))}
    for key, target in (("onto the device", device), ("onto cpu", "cpu")):
        other, other_opt = common.build_like(model)
        other.to(target)
        with jobwrap.Session(str(directory), environ={}, run_id="gpu-check", save_at_end=False,
                             device=target) as job:
            job.track(model=other, optimizer=other_opt)
            devices = sorted({str(p.device) for p in other.parameters()} |
                             {str(v.device) for s in other_opt.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0})
            same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(model.parameters(), other.parameters()))
        result[key] = {
            "devices": devices, "same": same, "ok": same and devices == [str(torch.device(target))]}
    result["ok"] = all(v["ok"] for k, v in result.items() if k.startswith("onto"))
    return result


def _locations(path: str) -> set[str]:
    seen: set[str] = set()
    torch.load(path, map_location=lambda storage, location: seen.add(location) or storage, weights_only=True)
    return seen


# ---------------------------------------------------------------- 3. ratios

def check_ratios(device: str, nbytes: int, reps: int) -> dict[str, Any]:
    """Medians of the same run; each ratio against its plain-torch or raw baseline."""
    model, optimizer = common.build(nbytes, device)
    size = common.state_bytes(model, optimizer)
    log(f"ratios: {size / 1e9:.2f} GB of state on {device}, {reps} repetitions")
    paused = pause.bench_pause(model, optimizer, reps, {}, batch=8)
    seconds: dict[str, list[float]] = {"jobwrap periodic pause": paused["jobwrap periodic pause (lazy)"],
                                       "torch.save + fsync": [], "raw write + fsync": [],
                                       "jobwrap signal -> committed": []}
    for rep in range(reps):
        seconds["torch.save + fsync"].append(common.torch_save(model, optimizer, common.WORK / "torch.pt"))
        seconds["raw write + fsync"].append(save.raw_write(model, optimizer, common.WORK / "raw.bin"))
        seconds["jobwrap signal -> committed"].append(
            save.jobwrap_signal_save(model, optimizer, common.fresh_dir(f"signal-{rep}")))
        common.cleanup()
    seconds.update(resume_onto_device(model, optimizer, device, reps))
    med = {k: common.median(v) for k, v in seconds.items()}
    ratios = {
        "periodic pause / blocking torch.save (GPU state)": med["jobwrap periodic pause"] / med["torch.save + fsync"],
        "emergency save / raw write (GPU state)": med["jobwrap signal -> committed"] / med["raw write + fsync"],
        "resume onto the GPU / raw read + host-to-device copy":
            med["jobwrap resume onto the device"] / med["raw read + host-to-device copy"],
    }
    return {"bytes": size, "repetitions": reps, "median_seconds": med, "samples": seconds, "ratios": ratios}


def resume_onto_device(model, optimizer, device: str, reps: int) -> dict[str, list[float]]:
    """Cold page cache each time: jobwrap's verified resume onto ``device`` against the file read raw
    into new host memory and copied to the device."""
    directory = common.fresh_dir("resume")
    with common.session(directory) as job:
        job.track(model=model, optimizer=optimizer)
        path = Path(job.save().path)
    size = path.stat().st_size
    target, target_opt = common.build_like(model)
    times: dict[str, list[float]] = {"jobwrap resume onto the device": [], "raw read + host-to-device copy": []}

    def jobwrap_resume() -> None:
        with common.session(directory, device=device) as again:
            again.track(model=target, optimizer=target_opt)
            _sync(device)

    def raw_resume() -> None:
        host = torch.empty(size, dtype=torch.uint8)
        view = memoryview(host.numpy())
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < size:
                done += f.readinto(view[done:])
        host.to(device)
        _sync(device)

    for rep in range(reps):
        for name, method in (("jobwrap resume onto the device", jobwrap_resume),
                             ("raw read + host-to-device copy", raw_resume))[::1 if rep % 2 == 0 else -1]:
            target_opt.state.clear()
            common.release_free_memory()
            common.drop_cache(path)
            started = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - started)
    common.cleanup()
    return times


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- report

def markdown(results: dict[str, Any]) -> str:
    """The GPU section's body (also results.md): what ran, where, and each ratio against its target."""
    demo, resume, ratios = results["demo"], results["resume"], results["ratios"]
    dry = results["dry_run"]
    lines = [f"Written by `scripts/gpu-check --report-only` from a run of `scripts/gpu-check"
             f"{' --cpu-dry-run` (CPU in place of CUDA: not GPU figures)' if dry else '`'} "
             f"on {results['machine']} ({results['software']}), {results['date']}, in {results['seconds']:.0f} s.",
             "",
             "| check | result |", "|---|---|",
             f"| `examples/train.py --deterministic` on {demo['device']}, preempted at steps {demo['preempted_at']} "
             f"(`CUBLAS_WORKSPACE_CONFIG=:4096:8`), against the uninterrupted run | "
             f"{'identical' if demo['identical'] else '**differs**'}, CUDA RNG states of "
             f"{demo['cuda_rng_devices']} device(s) included |",
             f"| a checkpoint written from {device_words(demo['device'])} (storages recorded on "
             f"{', '.join(resume['saved_locations'])}), resumed onto {demo['device']} | "
             f"{'ok' if resume['onto the device']['ok'] else '**failed**'} "
             f"({', '.join(resume['onto the device']['devices'])}) |",
             f"| the same, resumed onto the CPU | {'ok' if resume['onto cpu']['ok'] else '**failed**'} |",
             "",
             f"Ratios for a {ratios['bytes'] / 1e9:.2f} GB state (model and Adam's moments) on the device, "
             f"medians of {ratios['repetitions']} repetitions in one run:",
             "",
             "| ratio | target | value |", "|---|---|---|"]
    for name, value in ratios["ratios"].items():
        target = GPU_TARGETS[name]
        lines.append(f"| {name} | <= {target:g} | {value:.3f} {'met' if value <= target else '**not met**'} |")
    lines += ["", "| measurement | seconds, median |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in ratios["median_seconds"].items()]
    return "\n".join(lines) + "\n"


def device_words(device: str) -> str:
    return "CPU memory (dry run)" if device == "cpu" else "GPU memory"


def report_only(directory: Path, page: Path) -> None:
    results = json.loads((directory / "results.json").read_text())
    text = page.read_text()
    page.write_text(report.with_gpu_block(text, markdown(results)))
    log(f"wrote the GPU section of {page} from {directory / 'results.json'}")


def missing_requirements() -> list[str]:
    """What the checks need beyond the standard library, not found in this python."""
    import importlib.util

    missing = [name for name in ("psutil", "xxhash", "numpy") if importlib.util.find_spec(name) is None]
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        missing.append(f"torch 2.4 or newer (it has {torch.__version__})")
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "run" / "gpu-check"), help="the results directory")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same code on the CPU with small sizes (no GPU needed; seconds)")
    parser.add_argument("--gb", type=float, default=3.2, help="state size for the ratios on the GPU (GB)")
    parser.add_argument("--report-only", metavar="DIR", default=None,
                        help="measure nothing: write DIR/results.json into the GPU section of --page")
    parser.add_argument("--page", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.report_only:
        report_only(Path(args.report_only), Path(args.page))
        return 0
    missing = missing_requirements()
    if missing:
        log(f"this python lacks {', '.join(missing)}: use a python3 with a CUDA torch (2.4 or newer), psutil, "
            "xxhash and numpy (which the example and the raw baselines use)")
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        log("no CUDA device here: run it on a GPU machine, or use --cpu-dry-run to check the script")
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda:0"
    nbytes = 20 * 10**6 if args.cpu_dry_run else int(args.gb * 1e9)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common.WORK = out / "work"
    common.WORK.mkdir(exist_ok=True)
    started = time.monotonic()
    log(f"{common.machine()}; {common.software()}; device {device}")
    results: dict[str, Any] = {"dry_run": args.cpu_dry_run, "machine": common.machine(),
                               "software": common.software(),
                               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    phases: dict[str, float] = results.setdefault("phase_seconds", {})
    results["demo"] = check_demo(out, device)
    phases["demo"] = round(time.monotonic() - started, 1)
    log(f"demo: {'identical' if results['demo']['identical'] else 'DIFFERS'} "
        f"after preemptions at {results['demo']['preempted_at']}")
    results["resume"] = check_resume(out, device)
    log(f"resume of a checkpoint from {device}: {'ok' if results['resume']['ok'] else 'FAILED'}")
    phases["resume"] = round(time.monotonic() - started - sum(phases.values()), 1)
    results["ratios"] = check_ratios(device, nbytes, 2 if args.cpu_dry_run else 3)
    phases["ratios"] = round(time.monotonic() - started - sum(phases.values()), 1)
    shutil.rmtree(common.WORK, ignore_errors=True)
    for name, value in results["ratios"]["ratios"].items():
        log(f"{name}: {value:.3f} (target <= {GPU_TARGETS[name]:g})")
    results["seconds"] = round(time.monotonic() - started, 1)
    results["ok"] = results["demo"]["ok"] and results["resume"]["ok"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    log(f"{'all checks passed' if results['ok'] else 'a check FAILED'}; wrote {out}/results.json and results.md "
        f"in {results['seconds']:.0f} s; `scripts/gpu-check --report-only {out}` fills docs/benchmarks.md")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
