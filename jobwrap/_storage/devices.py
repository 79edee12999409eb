"""Where a resumed process puts a checkpoint, and which saved CUDA RNG stream goes to which device (pure).

A checkpoint written on a GPU node records each tensor's device (``cuda:3``).
jobwrap never trusts that: every rank loads the whole file onto its own device
(:func:`resume_device`), so a checkpoint moves between nodes with more, fewer
or no GPUs. The RNG streams are the one part tied to device numbers: each
rank saves the CUDA generator of every device it sees and which of them it
computed on; :func:`cuda_rng_plan` decides which saved state each device of
the resuming process gets back.
"""
from __future__ import annotations

from jobwrap.errors import ConfigError


def resume_device(*, local_rank: int, cuda_devices: int, configured: str | None) -> str:
    """This rank's device: ``configured`` if set (checked), else ``cuda:LOCAL_RANK`` (modulo the
    devices this process sees, as with one visible GPU per task), else the CPU."""
    if configured:
        return _checked(configured, cuda_devices)
    if cuda_devices > 0:
        return f"cuda:{local_rank % cuda_devices}"
    return "cpu"


def _checked(configured: str, cuda_devices: int) -> str:
    """A configured CUDA device that this process can reach, or a ConfigError naming the fix."""
    kind, _, index = configured.partition(":")
    if kind != "cuda":
        return configured
    if cuda_devices == 0:
        raise ConfigError(f"device is {configured!r} (JOBWRAP_DEVICE or device=) but this process sees no CUDA "
                          "device: unset it to resume on the CPU, or run where a GPU is visible")
    if index and (not index.isdigit() or int(index) >= cuda_devices):
        raise ConfigError(f"device is {configured!r} (JOBWRAP_DEVICE or device=) but this process sees "
                          f"{cuda_devices} CUDA device(s), cuda:0 to cuda:{cuda_devices - 1}: set one of them, "
                          "or unset it to use cuda:LOCAL_RANK")
    return configured


def cuda_rng_plan(*, saved: int, visible: int, saved_device: int | None,
                  device: int | None) -> tuple[list[tuple[int, int]], str | None]:
    """Which saved CUDA RNG state goes onto which device: ``[(saved index, device index)]`` and a
    one-line warning when the resume is not the saving node's layout.

    - same number of devices: state i onto device i, all of them (exact);
    - another number: this rank's device gets the stream of the device the rank computed on
      when it saved (``saved_device``), so a rank's own GPU stream follows it to any node;
      the other devices keep their seeds;
    - where the checkpoint does not say which device that was (or this rank is not on a GPU):
      state i onto device i for the devices both have;
    - no CUDA here: nothing is restored (the CPU streams still are).
    """
    if saved == 0:
        return [], None
    if visible == 0:
        return [], (f"checkpoint has CUDA RNG state for {saved} device(s) but this process has no CUDA: "
                    "resuming with the CPU random streams only; random draws on the GPU are not continued")
    if saved == visible:
        return [(i, i) for i in range(saved)], None
    if saved_device is not None and device is not None and 0 <= saved_device < saved and 0 <= device < visible:
        return [(saved_device, device)], (
            f"checkpoint has CUDA RNG state for {saved} device(s), this process sees {visible}: cuda:{device} "
            f"continues the stream of saved cuda:{saved_device}; other devices keep their seeds")
    overlap = min(saved, visible)
    return [(i, i) for i in range(overlap)], (
        f"checkpoint has CUDA RNG state for {saved} device(s), this process sees {visible}: restoring "
        f"cuda:0 to cuda:{overlap - 1} from the saved states of the same number")
