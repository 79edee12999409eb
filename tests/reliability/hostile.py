"""Hostile files and names: malicious pickles on the resume path, a crafted sharded folder, every
``torch.load`` pinned, traversal in ids and manifests, modes under umask 000, a planted symlink."""
from __future__ import annotations

import ast
import contextlib
import functools
import os
import pickle
import random
import signal
import stat
import tempfile
import warnings
from typing import Any, Callable

import torch

from jobwrap import ConfigError

from .badfiles import base_run, copy_of
from .files import edit_manifest, flip_bit, rehash
from .forked import Report, fork_trial
from .internals import FORMAT_VERSION, REPO, CheckpointStore, checksum_of, data_path
from .results import Campaign, Fault, Outcome, Row, short, verdict
from .training import (
    Weights,
    advance,
    capture_logs,
    environment,
    new_directory,
    open_session,
    resume,
    train_to,
    warnings_of,
)


class _Evil:
    """Pickles into a call of os.system: loading it would run a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _ran(marker: str) -> str:
    return "command NOT run; " if not os.path.exists(marker) else "COMMAND RAN; "


def check_malicious_pickle(base: str, workdir: str, kind: str) -> Outcome:
    """A checkpoint whose pickle runs a command when loaded, manifest consistent: refused on the resume path."""
    directory = copy_of(base, workdir)
    marker = os.path.join(os.path.dirname(directory), "pwned")
    if kind.startswith("torch zip"):
        torch.save({"model": {"w": torch.zeros(3)}, "step": 2, "epoch": 0, "tag": 2,
                    "jobwrap": {"format": FORMAT_VERSION, "evil": _Evil(marker)}}, data_path(directory, 2))
    else:
        with open(data_path(directory, 2), "wb") as f:
            pickle.dump({"jobwrap": _Evil(marker)}, f)
    rehash(directory, 2)
    # torch's own escape hatch must not reopen the hole
    forced = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if "FORCE_NO_WEIGHTS_ONLY" in kind else {}
    with environment(**forced), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about the pickle protocol
        outcome = resume(directory)
    if kind.startswith("torch zip"):
        # An intact torch file (its manifest agrees) that weights_only refuses is what was saved, not damage:
        # the start stops naming it, and nothing is set aside (issue 21, item 9).
        kept = os.path.exists(data_path(directory, 2)) and not any(".corrupt-" in n for n in os.listdir(directory))
        ok = not os.path.exists(marker) and "UnreadableStateError" in outcome.error and kept
        return ok, _ran(marker) + short(f"start stopped, nothing set aside: {outcome.error or outcome}")
    about = [w for w in outcome.warnings if "step-000000000002" in w]
    ok = not os.path.exists(marker) and outcome.step == 1 and outcome.content_ok and len(about) == 1
    return ok, _ran(marker) + (short(f"refused by weights_only, step 1 used: {about[0]}") if about else f"{outcome}")


def _plain_model_run(directory: str) -> None:
    """A plain (not sharded) module saved at steps 1 and 2."""
    with capture_logs(), open_session(directory) as job:
        job.track(model=torch.nn.Linear(4, 4), tag=-1)
        for _ in range(2):
            job.step_done()
            job.save()


def _point_at_evil_folder(directory: str, folder: str, marker: str) -> None:
    """Step 2 rewritten to keep its model in ``folder``, whose DCP .metadata is a malicious pickle."""
    # The step's own folder too, consistent, so that verification passes wherever it looks.
    for target in {os.path.normpath(os.path.join(directory, folder)), os.path.join(directory, "step-000000000002.dcp")}:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, ".metadata"), "wb") as f:
            pickle.dump(_Evil(marker), f)
    digest, size = checksum_of(os.path.join(directory, "step-000000000002.dcp", ".metadata"))
    payload = torch.load(data_path(directory, 2), weights_only=True)
    payload.pop("model")  # so that the model is looked for in the folder
    payload["jobwrap"]["dcp"] = {"folder": folder, "objects": ["model"], "world_size": 1, "bytes": size,
                                 "files": {".metadata": {"size": size, "checksum": digest}}}
    torch.save(payload, data_path(directory, 2))
    rehash(directory, 2)


def check_crafted_dcp_folder(workdir: str, where: str) -> Outcome:
    """A plain model's newest checkpoint, rewritten to name a sharded (DCP) folder whose .metadata is a
    malicious pickle, every checksum consistent: nothing runs, the start stops or falls back with one clear line."""
    directory = new_directory(workdir, "case")
    _plain_model_run(directory)
    marker = os.path.join(os.path.dirname(directory), "pwned")
    folder = {"own folder": "step-000000000002.dcp", "'../' path": "../evil.dcp",
              "absolute path": os.path.join(os.path.dirname(directory), "abs.dcp")}[where]
    _point_at_evil_folder(directory, folder, marker)
    with capture_logs() as records:
        step, error = None, ""
        try:
            with open_session(directory) as job:
                job.track(model=torch.nn.Linear(4, 4), tag=-1)
                step = job.resumed_from.step if job.resumed_from is not None else None
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            error = f"{type(exc).__name__}: {exc}"
    said = error or next((w for w in warnings_of(records) if "step-000000000002" in w), "")
    clear = "sharded" in said and ("not written by jobwrap" in said or "new directory" in said)
    ok = not os.path.exists(marker) and clear and step in (None, 1)
    return ok, _ran(marker) + short(f"{'stopped' if error else f'step {step} used'}: {said}")


_UNSAFE_LOADS = ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "dill.load", "cloudpickle.load",
                 "jit.load", "numpy.load", "np.load")


def _unsafe_loads(tree: ast.AST, where: Callable[[ast.AST], str]) -> tuple[int, list[str]]:
    """The loads in one module's tree, and the ones that could run code from a file."""
    found, bad = 0, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
            found += 1  # a restricted unpickler: only one that decides every global it lets through
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                bad.append(f"{where(node)} {node.name} without find_class")
        if not isinstance(node, ast.Call):
            continue
        target = ast.unparse(node.func)
        if target.endswith(_UNSAFE_LOADS):
            bad.append(f"{where(node)} {target}")
            found += 1
        if target in ("torch.load", "torch.serialization.load") or target.endswith(".torch.load"):
            found += 1
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords):
                bad.append(f"{where(node)} {target} without weights_only=True")
        if target.endswith(("add_safe_globals", "safe_globals")):
            bad.append(f"{where(node)} {target} widens what weights_only accepts")
    return found, bad


def torch_load_calls(root: str) -> tuple[int, list[str]]:
    """Every torch.load / pickle load in the package; the ones not pinned to weights_only=True."""
    found, bad = 0, []
    for folder, _, files in os.walk(os.path.join(root, "jobwrap")):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            count, unsafe = _unsafe_loads(tree, lambda node: f"{os.path.relpath(path, root)}:{node.lineno}")
            found += count
            bad += unsafe
    return found, bad


def _refused(directory: str, run_id: str | None, environ: dict[str, str]) -> bool:
    try:
        open_session(directory, environ=environ, run_id=run_id)
    except ConfigError:
        return True
    return False


def _paths_under(root: str) -> list[str]:
    """Every file and directory below ``root``."""
    return [os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files]


def check_traversal(workdir: str) -> Outcome:
    """Run ids, job ids and manifest fields with '..' or absolute parts never put a file outside the directory."""
    root = tempfile.mkdtemp(prefix="traversal-", dir=workdir)
    inside = os.path.join(root, "inside")
    directory = os.path.join(inside, "ck")
    refused = []
    for bad in ("../escape", "/tmp/abs", "a/../../b", "..", "x\\..\\y"):
        if _refused(directory, bad, {}):
            refused.append(bad)
        if _refused(directory, None, {"JOBWRAP_RUN_ID": bad}):
            refused.append("env:" + bad)
    problems = [] if len(refused) == 10 else [f"accepted run ids: {10 - len(refused)}"]
    # Ids the scheduler hands down are not validated as names: prove they never become paths.
    for environ in ({"JOBWRAP_JOB_ID": "../../../escape"}, {"SLURM_JOB_ID": "../../escape"},
                    {"JOBWRAP_JOB_ID": "/tmp/escape-abs"}):
        with capture_logs(), open_session(directory, environ=environ, run_id=None, adopt=True) as job:
            job.track(model=Weights(64), tag=0)
            job.step_done()
            job.save()
    # A hostile manifest: its 'file' points outside, its step is negative.
    edit_manifest(directory, 1, file="../../outside.pt")
    outcome = resume(directory, run_id=None, numel=64)
    outside = [os.path.relpath(path, root) for path in _paths_under(root)
               if not (path + os.sep).startswith(directory + os.sep) and path != inside]
    if outside:
        problems.append(f"files outside the directory: {outside}")
    if os.path.exists("/tmp/escape-abs") or os.path.exists("/tmp/abs"):
        problems.append("a file appeared at an absolute path")
    if outcome.error:
        problems.append(f"resume failed: {outcome.error}")
    return verdict(problems, f"{len(refused)}/10 bad run ids refused (argument and JOBWRAP_RUN_ID); hostile job ids "
                   f"and a manifest 'file' of ../../outside.pt wrote nothing outside the checkpoint directory")


def _modes_child(root: str, requeue_file: str) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        os.umask(0)
        directory = os.path.join(root, "nested", "deeper", "ck")
        job = open_session(directory, environ={"JOBWRAP_REQUEUE_FILE": requeue_file}, run_id=None,
                           save_every_steps=1, keep_last=2, async_save=True)
        weights = Weights(256)
        with contextlib.suppress(SystemExit), job:
            job.track(model=weights, tag=-1)
            for _ in range(4):
                advance(job, weights)
            job.save()
            os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
        flip_bit(CheckpointStore(directory).committed()[0].path, random.Random(1))
        resume(directory, run_id=None, numel=256)  # quarantines the damaged one: a rename, modes kept
        report("ok")
    return body


def _kind(name: str) -> str:
    """What a created path is, for the report: its extension, or what it is for."""
    base = name.rsplit("/", 1)[-1]
    if ".corrupt-" in base:
        return "quarantined files"
    if name.startswith("<"):
        return name.strip("<>")
    return {"run.json": "run.json", "events.jsonl": "events.jsonl"}.get(
        base, f"*.{base.rsplit('.', 1)[-1]}" if "." in base else "directories")


def check_modes(workdir: str) -> Outcome:
    """Under umask 000, nothing jobwrap creates (directories, checkpoints, manifests, run.json, events,
    quarantined files, the requeue file) is group- or world-writable."""
    root = tempfile.mkdtemp(prefix="modes-", dir=workdir)
    requeue_file = os.path.join(tempfile.mkdtemp(prefix="requeue-", dir=workdir), "requeue")
    trial = fork_trial(_modes_child(root, requeue_file), timeout=120)
    if not trial.find("ok"):
        return False, f"child failed: {trial.find('error') or trial.code}"
    created = [(os.path.relpath(path, root), stat.S_IMODE(os.lstat(path).st_mode)) for path in _paths_under(root)]
    if os.path.exists(requeue_file):
        created.append(("<requeue file>", stat.S_IMODE(os.lstat(requeue_file).st_mode)))
    bad = [f"{name} {oct(mode)}" for name, mode in created if mode & 0o022]
    kinds = sorted({_kind(name) for name, _ in created})
    ok = not bad and len(created) >= 8
    return ok, (f"{len(created)} files and directories checked ({', '.join(kinds)}): none group/world-writable"
                if ok else f"writable by others: {bad}")


def check_symlinked_events(workdir: str) -> Outcome:
    """A symlink planted as events.jsonl (or run.json) is not followed out of the directory."""
    root = tempfile.mkdtemp(prefix="symlink-", dir=workdir)
    directory = os.path.join(root, "ck")
    os.makedirs(directory)
    victim = os.path.join(root, "victim.txt")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.symlink(victim, os.path.join(directory, "events.jsonl"))
    with capture_logs(), contextlib.suppress(Exception):
        train_to(directory, [1])
    with open(victim) as f:
        ok = f.read() == "precious\n"
    return ok, ("the events log refused to follow the symlink; the file outside is unchanged" if ok
                else "jobwrap appended to a file outside the directory through a symlink")


def section(c: Campaign) -> None:
    print("hostile files", flush=True)
    base = base_run(c.workdir)
    for kind in ("torch zip", "plain pickle", "torch zip, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set"):
        expected = ("refused, nothing runs, start stopped, nothing set aside" if kind.startswith("torch zip")
                    else "refused, nothing runs, previous used")
        c.run(Fault("hostile", f"malicious pickle ({kind}) as the newest checkpoint, manifest consistent, "
                    "loaded through Session resume", expected,
                    functools.partial(check_malicious_pickle, base), (kind,)))
    for where in ("own folder", "'../' path", "absolute path"):
        c.run(Fault("hostile", f"a plain model's checkpoint naming a sharded folder ({where}) whose DCP .metadata "
                    "is a malicious pickle, checksums consistent", "nothing runs; a clear error or the previous used",
                    check_crafted_dcp_folder, (where,)))
    found, bad = torch_load_calls(REPO)
    c.add(Row("hostile", "every torch.load in jobwrap/ pinned to weights_only=True; no pickle/safe_globals; "
              "an Unpickler only with its own find_class", found,
              "all pinned, no option to unpin", "all pinned" if not bad else "; ".join(bad), len(bad)))
    for label, check in (("run id / job id / manifest fields with '..' or absolute parts", check_traversal),
                         ("umask 000: modes of everything jobwrap creates", check_modes),
                         ("events.jsonl planted as a symlink to a file outside", check_symlinked_events)):
        c.run(Fault("hostile", label, "nothing written outside / nothing world-writable", check))
