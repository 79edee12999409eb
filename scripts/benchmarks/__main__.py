"""jobwrap against plain torch.save / torch.load, torch.distributed.checkpoint and the disk, side by side in one run.

Run through ``scripts/bench`` (sets up .venv with matplotlib). For each state
size (a model of 4096x4096 or 1024x1024 layers and Adam's two moments) it
measures, medians over repetitions, in rotating order:

  save      raw durable write of the same tensor bytes (write + one fsync: the disk's limit),
            torch.save + fsync, jobwrap's signal-to-committed save (a real SIGUSR1 to this process)
            (save.py)
  pause     the training thread's pause for a jobwrap periodic (background) save,
            against a blocking torch.save + fsync (pause.py)
  resume    to a ready model and optimizer, cold page cache: jobwrap (verified), torch.load +
            load_state_dict, a raw read of the file into new memory (and into memory already touched)
            (resume.py)
  step      the wrapper's cost per step (step_done with nothing due), on a tiny model (step.py)
  memory    peak extra resident memory of each (VmHWM after a reset, minus the resident size before)
  peers     torch.distributed.checkpoint's save, async_save (thread and process) and load on the same
            state (peers.py)
  relaunch  a real signal to `jobwrap run` -> the relaunched trainer's first new step, split into its
            parts (relaunch.py)
  position  a mid-epoch resume's time to its first batch against the position in the epoch
            (resume_position.py)
  ranks     the pause of a periodic save with 2 ranks, background against blocking
            (rank_pause.py); the signal's save with 1, 2 and 4 ranks, throttled
            writers and not (rank_write.py)

report.py writes the page and its plots; common.py holds what they share. Benchmark files live under
the repository's ignored run/ directory and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common, rank_pause, rank_write, report, resume_position
from benchmarks.common import REPO, build, build_like, drop_cache, log, machine, median, software, state_bytes
from benchmarks.pause import bench_gpu_pause, bench_pause
from benchmarks.peers import bench_peers
from benchmarks.relaunch import bench_relaunch, plot_relaunch, print_relaunch
from benchmarks.resume import bench_resume
from benchmarks.save import bench_save
from benchmarks.step import bench_step

def measure_sections(quick: bool) -> dict[str, dict]:
    """The measurements taken once per run, each printed as it ends."""
    position = resume_position.bench_resume_position(*((3, 200) if quick else (5, 1000)))
    log("\n== resume against position in the epoch ==\n" + "\n".join(resume_position.summary_lines(position)))
    pause = rank_pause.bench_rank_pause(3 if quick else 5, common.WORK, nbytes=(100 if quick else 400) << 20)
    rank_pause.print_rank_pause(pause)
    log("\n== emergency save against ranks, throttled writers ==")
    memory = _memory_dir()
    try:
        write = rank_write.bench_rank_write((128 if quick else 384) << 20, reps=1 if quick else 3,
                                                  directory=memory / "rank-write")
    finally:
        shutil.rmtree(memory, ignore_errors=True)
    rank_write.print_rank_write(write)
    return {"resume_position": position, "rank_pause": pause, "rank_write": write}



def _memory_dir() -> Path:
    """A tmpfs for the throttled-writer benchmark (the per-process limit, not the one disk), else run/bench."""
    shm = Path("/dev/shm")
    return shm / f"jobwrap-bench-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else common.WORK



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small state only, fewer repetitions (a few minutes)")
    parser.add_argument("--out", default=None,
                        help="where the report goes (default: docs/, or run/bench-quick/ with --quick)")
    parser.add_argument("--report-only", metavar="JSON", default=None,
                        help="measure nothing: write the page and plots again from a benchmarks.json")
    args = parser.parse_args()
    if args.report_only:
        out = Path(args.out) if args.out else Path(args.report_only).resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        results = json.loads(Path(args.report_only).read_text())
        common.RECORDED.update({k: results[k] for k in ("machine", "software") if k in results})
        relaunch = results.get("relaunch")
        sections = {key: results[key] for key in report.SECTIONS if results.get(key)}
        plots = report.plot(results["sizes"], out) + ([plot_relaunch(relaunch, out)] if relaunch else [])
        section_plots = report.plot_sections(sections, out)
        report.write_markdown(results["sizes"], results["step"], plots, results.get("gpu") or {}, out, args, relaunch,
                       sections, section_plots)
        log(f"wrote {out / 'benchmarks.md'} and {', '.join(plots + list(section_plots.values()))} "
            f"from {args.report_only}")
        return
    args.reps_small = 7 if args.quick else 9
    args.reps_large = 5
    sizes = [("100MB", 100 * 10**6, args.reps_small, 32)]   # name, bytes, repetitions, training batch
    if not args.quick:
        sizes.append(("3GB", 3_200 * 10**6, args.reps_large, 8))
    out = Path(args.out) if args.out else (REPO / "run" / "bench-quick" if args.quick else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    common.WORK.mkdir(parents=True, exist_ok=True)
    need = 3 * max(n for _, n, _, _ in sizes)
    free = shutil.disk_usage(common.WORK).free
    if free < need:
        sys.exit(f"bench: {free / 1e9:.1f} GB free for run/bench, need {need / 1e9:.1f} GB; free space or use --quick")
    log(f"machine: {machine()}; {software()}")
    started = time.monotonic()
    summaries = []
    gpu: dict[str, float] = {}
    try:
        step = bench_step(3 if args.quick else 5)
        log(f"step_done: {median(step['step_done (us)']):.2f} us per step")
        for size_name, nbytes, reps, batch in sizes:
            model, optimizer = build(nbytes, "cpu")
            actual = state_bytes(model, optimizer)
            log(f"\n{size_name}: {actual / 1e6:.0f} MB of state, {reps} repetitions")
            memory: dict[str, list[int]] = {}
            save = bench_save(model, optimizer, reps, memory)
            log("  save: done")
            pause = bench_pause(model, optimizer, min(reps, 3) if args.quick else reps, memory, batch)
            log("  pause: done")
            resume = bench_resume(model, optimizer, reps, memory)
            log("  resume: done")
            target, target_opt = build_like(model)
            peers = bench_peers(model, optimizer, target, target_opt, min(reps, 3) if args.quick else reps, common.WORK,
                                drop_cache)
            del target, target_opt
            log("  DCP: done")
            summary = report.summarize(size_name, actual, batch, save, pause, resume, memory, peers)
            report.print_summary(summary)
            summaries.append(summary)
            del model, optimizer
            gc.collect()
        gpu = bench_gpu_pause(sizes[-1][1], 3) or {}
        if gpu:
            log(f"GPU: {gpu}")
        relaunch = bench_relaunch(2 if args.quick else 5, common.WORK, drop_cache)
        print_relaunch(relaunch)
        sections = measure_sections(args.quick)
    finally:
        shutil.rmtree(common.WORK, ignore_errors=True)
    step_us = median(step["step_done (us)"])
    log(f"\n  {'step overhead / 1 ms step':46s} {step_us / 1000:6.4f}  target <= 0.01  "
        f"{'met' if step_us / 1000 <= 0.01 else 'NOT MET'}")
    section_plots = report.plot_sections(sections, out)
    plots = report.plot(summaries, out) + [plot_relaunch(relaunch, out)]
    report.write_markdown(summaries, step, plots, gpu, out, args, relaunch, sections, section_plots)
    (out / "benchmarks.json").write_text(json.dumps({"machine": machine(), "software": software(),
                                                     "sizes": summaries, "step": step, "gpu": gpu,
                                                     "relaunch": relaunch, **sections}, indent=1))
    where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    written = ", ".join(plots + list(section_plots.values()))
    log(f"\nwrote {where}/benchmarks.md, {where}/benchmarks.json and {written} "
        f"in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
