"""docs/benchmarks.md and its plots from the measurements: the targets, the summaries, the page (with the GPU
section scripts/gpu-check writes, kept when the page is written again)."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from benchmarks import rank_pause, rank_write, resume_position
from benchmarks.common import log, machine, median, software
from benchmarks.pause import PAUSE_KEYS
from benchmarks.peers import PEER_KEYS
from benchmarks.relaunch import OVERHEAD_TARGET, relaunch_lines
from benchmarks.resume import RESUME_KEYS
from benchmarks.save import SAVE_KEYS

TARGETS = {
    "emergency save / raw write": 1.15,
    "periodic pause / blocking torch.save": 0.10,
    "resume / raw cold read": 1.30,
    "step overhead / 1 ms step": 0.01,
    "async extra memory / state": 1.0,
    "emergency save / DCP save": 1.0,
    "periodic pause / DCP async_save blocking": 1.0,
    "resume / DCP load": 1.0,
}


GPU_BEGIN, GPU_END = "<!-- gpu-check: begin -->", "<!-- gpu-check: end -->"


GPU_NOT_RUN = ("Not run yet: no GPU machine has been lent to this project so far. On a machine with one GPU and a "
               "python3 with a CUDA torch (2.4 or newer), psutil, xxhash and numpy: `scripts/gpu-check --out DIR` "
               "(at most about 8 minutes; nothing is installed, jobwrap comes from the checkout), then "
               "`scripts/gpu-check --report-only DIR` writes its results here.\n")


def gpu_block(text: str) -> str | None:
    """The body of a benchmarks page's GPU section (written by scripts/gpu-check), if it has one."""
    if GPU_BEGIN in text and GPU_END in text:
        return text.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0].strip("\n") + "\n"
    return None



def with_gpu_block(text: str, body: str) -> str:
    """``text`` with its GPU section's body replaced by ``body`` (the section appended where missing)."""
    block = f"{GPU_BEGIN}\n{body}{GPU_END}"
    if GPU_BEGIN in text and GPU_END in text:
        head, rest = text.split(GPU_BEGIN, 1)
        return head + block + rest.split(GPU_END, 1)[1]
    return text.rstrip("\n") + f"\n\n## GPU\n\n{block}\n"



def summarize(size_name: str, nbytes: int, batch: int, save: dict, pause: dict, resume: dict,
              memory: dict, peers: dict) -> dict:
    samples = {k: v for k, v in {**save, **pause, **resume, **peers}.items() if isinstance(v, list)}
    med = {k: median(v) for k, v in samples.items()}
    dcp_blocking = min(med["DCP async_save blocking (thread)"], med["DCP async_save blocking (process)"])
    mem = {k: (median([m for m in v if m >= 0]) if any(m >= 0 for m in v) else None) for k, v in memory.items()}
    ratios = {
        "emergency save / raw write": med["jobwrap signal -> committed"] / med["raw write + fsync"],
        "periodic pause / blocking torch.save": med["jobwrap periodic pause (lazy)"] / med["torch.save + fsync"],
        "resume / raw cold read": med["jobwrap resume (verified)"] / med["raw read into new memory"],
        "async extra memory / state": (mem.get("jobwrap periodic (async)") or 0) / pause["checkpoint bytes"],
        "emergency save / DCP save": med["jobwrap signal -> committed"] / med["DCP save"],
        "periodic pause / DCP async_save blocking": med["jobwrap periodic pause (lazy)"] / dcp_blocking,
        "resume / DCP load": med["jobwrap resume (verified)"] / med["DCP load"],
    }
    other = {
        "torch.save / raw write": med["torch.save + fsync"] / med["raw write + fsync"],
        "eager-copy pause / blocking torch.save": med["jobwrap periodic pause (eager)"] / med["torch.save + fsync"],
        "torch.load resume / raw cold read": med["torch.load + load_state_dict"] / med["raw read into new memory"],
        "resume / raw read into touched memory":
            med["jobwrap resume (verified)"] / med["raw read into touched memory"],
        "train step slowdown during a background save":
            med["train step during the background save (lazy)"] / med["train step, no save"],
        "DCP save / raw write": med["DCP save"] / med["raw write + fsync"],
        "DCP async_save blocking, thread / process":
            med["DCP async_save blocking (thread)"] / med["DCP async_save blocking (process)"],
        "DCP load / raw cold read": med["DCP load"] / med["raw read into new memory"],
    }
    return {"size": size_name, "bytes": nbytes, "batch": batch, "median_seconds": med, "memory_bytes": mem,
            "ratios": ratios, "other_ratios": other, "staging_bytes": pause.get("staging bytes", 0),
            "checkpoint_bytes": pause.get("checkpoint bytes", 0),
            "samples": samples}



def met(name: str, value: float) -> bool:
    """Against its target; memory at 1 % resolution (its measurement moves by a few MB run to run)."""
    if name == "async extra memory / state":
        return round(value, 2) <= TARGETS[name]
    return value <= TARGETS[name]



def print_summary(s: dict) -> None:
    log(f"\n== {s['size']} state ({s['bytes'] / 1e6:.0f} MB) ==")
    for name in SAVE_KEYS + PAUSE_KEYS + RESUME_KEYS + PEER_KEYS:
        memory = s["memory_bytes"].get(name)
        extra = f"   peak extra memory {memory / 1e6:6.0f} MB" if memory is not None else ""
        log(f"  {name:46s} {s['median_seconds'][name]:8.3f} s{extra}")
    memory = s["memory_bytes"].get("jobwrap periodic (async)")
    if memory is not None:
        log(f"  {'jobwrap periodic saves (staging + writer)':46s} {'':10s}   peak extra memory {memory / 1e6:6.0f} MB")
    for name, value in s["ratios"].items():
        target = TARGETS[name]
        log(f"  {name:46s} {value:6.3f}  target <= {target:g}  {'met' if met(name, value) else 'NOT MET'}")
    for name, value in s["other_ratios"].items():
        log(f"  {name:46s} {value:6.3f}")



def plot(summaries: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups = [
        ("save: signal to durable", SAVE_KEYS + ["DCP save"]),
        ("training pause for a periodic save", ["torch.save + fsync", "DCP async_save blocking (thread)",
                                                "DCP async_save blocking (process)",
                                                "jobwrap periodic pause (eager)", "jobwrap periodic pause (lazy)"]),
        ("resume to ready, cold page cache", RESUME_KEYS + ["DCP load"]),
    ]
    for s in summaries:
        med = s["median_seconds"]
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
        for ax, (title, keys) in zip(axes, groups):
            keys = [k for k in keys if k in med]  # a report of an older run has no DCP figures
            values = [med[k] for k in keys]
            labels = [textwrap.fill(k, 13, break_long_words=False) for k in keys]
            colors = ["#1f77b4" if k.startswith("jobwrap") else "#bbbbbb" for k in keys]
            bars = ax.bar(range(len(keys)), values, color=colors)
            ax.set_xticks(range(len(keys)), labels, fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("seconds (median)")
            for bar, value in zip(bars, values):
                ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"jobwrap vs torch.save / torch.load vs DCP vs the disk: {s['size']} state "
                     f"({s['bytes'] / 1e9:.2f} GB); {machine()}", fontsize=11)
        fig.tight_layout()
        name = f"bench-{s['size'].lower()}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names



def _verdict(name: str, value: float) -> str:
    return f"{value:.3f} {'met' if met(name, value) else '**not met**'}"


#: Measured once per run, each by its own script: key in benchmarks.json -> the script's module, which has
#: ``targets(result)``, ``report_lines(result, plot_name)`` and ``plot(result, out, title_suffix)``.
SECTIONS = {"resume_position": resume_position, "rank_pause": rank_pause, "rank_write": rank_write}


def run_targets(relaunch: dict | None, sections: dict[str, dict]) -> list[tuple[str, float, float]]:
    """(name, target, value) of the targets measured once per run rather than per state size."""
    found = []
    if relaunch:
        found.append(("relaunch: jobwrap's own parts - disk time (s)", OVERHEAD_TARGET, relaunch["overhead"]))
    for key, result in sections.items():
        found += SECTIONS[key].targets(result)
    return found



def plot_sections(sections: dict[str, dict], out: Path) -> dict[str, str]:
    return {key: SECTIONS[key].plot(result, out, f"; {machine()}") for key, result in sections.items()}



def write_markdown(summaries: list[dict], step: dict, plots: list[str], gpu: dict, out: Path,
                   args: argparse.Namespace, relaunch: dict | None = None, sections: dict[str, dict] | None = None,
                   section_plots: dict[str, str] | None = None) -> None:
    step_us = median(step["step_done (us)"])
    lines = [
        "# Benchmarks: jobwrap against plain torch.save, torch.load, torch.distributed.checkpoint and the disk",
        "",
        "Written by `./scripts/bench` (this page, its plots and `benchmarks.json`; rerun it rather than edit). "
        f"Machine: {machine()} ({software()}); a local ext4 disk on a virtual block device, shared with other "
        "jobs, so absolute figures are noisy. Each figure is the median of its repetitions, the methods run in "
        "rotating order, and each ratio compares figures of the same run.",
        "",
        "The state is a stack of square linear layers and Adam's two moments (a third model, two thirds "
        "optimizer), the `{model, optimizer}` a training script saves. Repetitions: "
        + ", ".join(f"{len(s['samples']['raw write + fsync'])} for the {s['size']} state" for s in summaries) + ".",
        "",
        "## Targets",
        "",
        "| ratio | target | " + " | ".join(f"{s['size']} state" for s in summaries) + " |",
        "|---|---|" + "---|" * len(summaries),
    ]
    for name, target in TARGETS.items():
        if name == "step overhead / 1 ms step":
            cells = [_verdict(name, step_us / 1000.0)] * len(summaries)
        else:
            cells = [_verdict(name, s["ratios"][name]) if name in s["ratios"] else "not measured" for s in summaries]
        lines.append(f"| {name} | <= {target:g} | " + " | ".join(cells) + " |")
    once = run_targets(relaunch, sections or {})
    if once:
        lines += ["", "Measured once per run (their sections below):", "", "| measure | target | value |",
                  "|---|---|---|"]
        lines += [f"| {name} | <= {target:g} | {value:.3f} {'met' if value <= target else '**not met**'} |"
                  for name, target, value in once]
    lines += ["", "Other ratios from the same runs:", "",
              "| ratio | " + " | ".join(f"{s['size']} state" for s in summaries) + " |",
              "|---|" + "---|" * len(summaries)]
    for name in summaries[0]["other_ratios"]:
        lines.append(f"| {name} | " + " | ".join(f"{s['other_ratios'].get(name, float('nan')):.3f}"
                                                 for s in summaries) + " |")
    lines += ["", "## Medians", "",
              "| measurement | " + " | ".join(f"{s['size']}: seconds, median (min-max) | {s['size']}: peak extra memory"
                                             for s in summaries) + " |",
              "|---|" + "---|---|" * len(summaries)]
    for key in [k for k in SAVE_KEYS + PAUSE_KEYS + RESUME_KEYS + PEER_KEYS if k in summaries[0]["samples"]]:
        cells = []
        for s in summaries:
            memory = s["memory_bytes"].get(key)
            if key == "jobwrap periodic pause (lazy)":
                memory = s["memory_bytes"].get("jobwrap periodic (async)")
            samples = s["samples"][key]
            cells.append(f"{s['median_seconds'][key]:.3f} ({min(samples):.3f}-{max(samples):.3f}) | "
                         + (f"{memory / 1e6:.0f} MB" if memory is not None else ""))
        lines.append(f"| {key.strip()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A ratio below 1 against the raw write or read means equal within this machine's noise, not faster "
        "than the disk: compare the ranges.",
        "",
        "State sizes: " + ", ".join(f"{s['size']} = {s['bytes'] / 1e6:.0f} MB (training step: forward and "
                                     f"backward of a batch of {s['batch']}, then Adam)" for s in summaries) + ". "
        "The memory of the periodic saves (staging buffers, reserved after the first step, plus the writer, over "
        "three saves) is compared with the checkpoint's size, at 1 % resolution: "
        + ", ".join(f"{s['size']}: staging {s['staging_bytes'] / 1e6:.1f} MB for a {s['checkpoint_bytes'] / 1e6:.1f} MB "
                    "checkpoint" for s in summaries) + ".",
        "",
        f"Per-step cost of the wrapper (a step boundary with nothing due): **{step_us:.2f} µs**, "
        f"{step_us / 10:.3f} % of a 1 ms step. A tiny model's training step (Linear(16, 16), SGD) took "
        f"{median(step['tiny step, plain (us)']):.0f} µs plain and {median(step['tiny step, jobwrap (us)']):.0f} µs "
        "with `step_done()` after it (the difference is within this machine's noise).",
        "",
    ]
    if gpu:
        lines += ["GPU state (device to pinned host memory): " +
                  ", ".join(f"{k}: {v:.3f} s" for k, v in gpu.items()) + ".", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    if relaunch:
        lines += relaunch_lines(relaunch)
    for key, result in (sections or {}).items():
        lines += SECTIONS[key].report_lines(result, (section_plots or {}).get(key))
    lines += [
        "## What is measured",
        "",
        "- **raw write + fsync**: the tensors' bytes written to a new file with `os.write`, 8 MiB per call "
        "straight from the tensors' memory (the fastest of the plain variants tried), then one `fsync`: the "
        "disk's limit for these bytes.",
        "- **torch.save + fsync**: `torch.save({model, optimizer}, f)`, flush, `fsync`, with torch's defaults "
        "(a CRC32 of every record).",
        "- **jobwrap commit (store.save)**: jobwrap's write and commit protocol alone, from the same state.",
        "- **jobwrap signal -> committed**: a real `SIGUSR1` sent to the process, through the trap, the step "
        "boundary and the whole commit protocol (data fsynced and renamed, manifest fsynced and renamed, "
        "directory fsynced) until `Preempted` is raised.",
        "- **jobwrap periodic pause**: in a loop that trains, the time `step_done()` blocks when a periodic save "
        "is due (rebuild the state's containers, copy what must be copied now, hand off to the writer thread) "
        "plus the time the next `optimizer.step()` waits for the parameters and optimizer state still being "
        "copied on the writer thread (*lazy*, the default). *eager* (`lazy_copy=False`) copies every tensor "
        "inside `step_done()`. The pause of a loop that saves inline is the blocking `torch.save + fsync`. "
        "*background write*: from the save being due to the checkpoint committed. *train step*: forward, "
        "backward and Adam, alone and while the writer copies and writes: on two cores the writer (at a lower "
        "priority) still takes CPU time and memory bandwidth from a step that uses both cores, which a GPU "
        "step would not feel.",
        "- **resume**, cold page cache (the file evicted with `posix_fadvise(DONTNEED)` before each read): a "
        "raw `readinto` of the file into memory already touched (the disk alone) and into new memory (what any "
        "loader in a new process pays: the pages must be mapped); `torch.load` then `load_state_dict` of model "
        "and optimizer; jobwrap's `Session` start plus `track(model, optimizer)`, which also verifies the "
        "checksum of every byte. The model exists already, the optimizer has no state yet, as in a new process.",
        "- **DCP** (`torch.distributed.checkpoint`, `scripts/benchmarks/peers.py`), as its documentation shows it, "
        "in a one-rank gloo process group: `get_state_dict(model, optimizer)` then `save` (its file writer "
        "fsyncs each file); `async_save` with the thread and with the process checkpointer (torch's default "
        "staging: a blocking copy to CPU memory, no pinned or shared memory on a CPU machine), timed until the "
        "call returns, the write then awaited untimed (the process checkpointer's daemon is started once, "
        "untimed); `load` into a new model's `get_state_dict` (which initialises the optimizer's state) then "
        "`set_state_dict`, cold page cache. The pause target compares with the faster of the two `async_save`s.",
        "- **relaunch**: see its section above; the parts come from the run's `events.jsonl` (`signal`, `save`, "
        "`exit`, and `start` with `load_seconds` and `read_seconds`) and the trainer's wall-clock timestamps; "
        "the new process's creation time from `/proc` (10 ms resolution), its predecessor's end by polling its "
        "pid each millisecond.",
        "- **peak extra memory**: the resident set's high-water mark (reset through `/proc/self/clear_refs`) "
        "minus the resident size before; the allocator's free memory is returned to the system first "
        "(`malloc_trim`), so that memory freed earlier is not silently reused.",
        "",
        "## How jobwrap gets there",
        "",
        "- **Save** (`jobwrap/_storage/store.py`): `torch.save` writes through a file object that hashes (xxh3-64) and "
        "writes each 8 MiB piece of a tensor straight from the tensor's memory while the piece is in the CPU "
        "cache; torch's own CRC32 is off for the duration (the previous setting is restored after), since "
        "jobwrap's checksum covers the whole file; one `fsync`. The file stays a plain `torch.save` file: "
        "`torch.load(path, weights_only=True)` opens it.",
        "- **Periodic saves** (`jobwrap/_storage/snapshot.py`; `async_save=True`, `JOBWRAP_ASYNC_SAVE`): the training "
        "thread copies the state into staging buffers that are allocated once, in the background after the "
        "first step (pinned when the tensors are on a GPU), and reused; a writer thread writes and commits. "
        "With `lazy_copy=True` (`JOBWRAP_LAZY_COPY`) the tracked optimizers' CPU parameters and state are "
        "copied by the writer thread while the next step's forward and backward run: only `optimizer.step()` "
        "changes them, and a step pre-hook holds it until the copy is done (version counters prove nothing else "
        "changed them meanwhile; if something did, that save is dropped and later ones copy everything during "
        "the pause). At most one save is in flight; a "
        "save that comes due meanwhile is skipped. A failed background save is raised at the next step "
        "boundary (or when the session closes), never dropped. **Memory: one extra copy of the state** (the "
        "staging buffers), plus the writer's 1 MiB gather buffer and the pickled structure.",
        "- **A signal during a background save**: a save of the same step is awaited; otherwise the one in "
        "flight is cancelled at its next piece and the current state is written at once, unless it would "
        "commit sooner and the grace window cannot hold both (then it commits first, and the new save follows).",
        "- **Grace window** (`jobwrap/_storage/deadline.py`): `grace_seconds` (`JOBWRAP_GRACE_SECONDS`, the signal's lead "
        "time) and Slurm's job end time, against the save speed recorded in the checkpoints' manifests. jobwrap "
        "warns at start (from the directory's earlier saves) and after the first save when a save would need "
        "more than 80 % of the window, and names the `--signal` lead time to ask for.",
        "- **Resume**: `torch.load` reads the checkpoint through a reader that hashes the bytes in file order "
        "as torch pulls them into its tensors, so the checksum costs no second read and nothing is used before "
        "it matched.",
        "- **Mid-epoch resume** (`jobwrap/_loop/skipping.py`): the sampler's order for the epoch is drawn as in "
        "the uninterrupted run and the batches already trained are skipped by index, nothing loaded; each "
        "batch's worker RNG (torch, `random`, NumPy) is seeded from the loader's base seed and the batch's index, "
        "so batch k's random draws do not depend on batches 0..k-1. A loader jobwrap cannot skip (its own "
        "`__iter__`, an IterableDataset without `state_dict`) is still replayed; torchdata's "
        "`StatefulDataLoader` resumes through its own `state_dict`.",
        "- **Several ranks, periodic saves**: every rank hands its small state (RNG, data position) to rank 0 "
        "and goes on; rank 0 stages and writes in the background as one process does. Rank 0's outcome reaches "
        "every rank at the next agreement, so a failure is raised on all of them at the same step.",
        "- **Several ranks, a signal's save** (`jobwrap/_storage/striped.py`): from `stripe_min_bytes` "
        "(`JOBWRAP_STRIPE_MIN_BYTES`, 1 GiB by default) of replicated state on, every rank writes its share of "
        "the tensors (largest first onto the least-loaded rank, the same plan on every rank) into the step's "
        "folder, and rank 0 commits one manifest over the parts; `jobwrap export` writes one "
        "`torch.load(weights_only=True)` file from any checkpoint.",
        "",
        "## Not covered",
        "",
        "- A GPU: this machine has none. On a GPU machine the same script also measures the pause of a periodic "
        "save of a state on the GPU (device to pinned host memory, copied during the pause); `scripts/gpu-check` "
        "checks the GPU path and fills the GPU section below.",
        "- Sharded (FSDP) state with several ranks: its periodic saves are still synchronous (every rank writes "
        "its part through DCP), and not measured here.",
    ]
    page = out / "benchmarks.md"
    kept = gpu_block(page.read_text()) if page.exists() else None  # scripts/gpu-check's, from a GPU machine
    page.write_text(with_gpu_block("\n".join(lines) + "\n", kept or GPU_NOT_RUN))
