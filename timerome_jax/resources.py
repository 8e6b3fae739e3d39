"""Measured cost of a piece of work: wall-clock seconds and peak memory, read from the process.

Nothing here estimates. Two memories are read:

* host: the process's peak resident set size. On Linux `VmHWM` in `/proc/self/status` (the
  high-water mark of the resident set); elsewhere `resource.getrusage(RUSAGE_SELF).ru_maxrss`
  (kilobytes on Linux, bytes on macOS). Both are process-lifetime maxima; on Linux the mark can be
  reset to the current resident set by writing "5" to `/proc/self/clear_refs`, which `Measure`
  does when it starts (when the kernel allows it, recorded as `host_peak_reset`), so the peak it
  reports belongs to the measured phase (plus whatever was already resident when it began).
* device: `jax.devices()[0].memory_stats()['peak_bytes_in_use']` where the backend provides it
  (GPU/TPU; the CPU backend returns None, recorded as null). XLA has no API to reset that peak, so
  `Measure` records it before and after: if `device_peak_bytes_after` exceeds
  `device_peak_bytes_before`, the phase set a new peak and the after value is that peak; if they
  are equal, the phase's own peak was at most that value (an earlier phase was higher), and
  `device_peak_is_phase_peak` says which case occurred.

Wall-clock is `time.perf_counter()`; callers that compile ahead of time time the compilation
separately (see `timerome_jax.baselines.training`).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (e.g. VmHWM, VmRSS) in bytes, or None where unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (VmHWM, else getrusage)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def host_rss_bytes() -> int | None:
    """Current resident set size in bytes (VmRSS), or None where /proc is unavailable."""
    return _status_bytes("VmRSS")


def reset_host_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux ≥ 4.0). Returns whether it was reset."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def device_memory_stats(device=None) -> dict | None:
    """`memory_stats()` of the device (default: the first), or None where the backend has none."""
    import jax

    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without the API raise different errors
        return None
    return dict(stats) if stats else None


def device_peak_bytes(device=None) -> int | None:
    stats = device_memory_stats(device)
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def device_description() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": getattr(device, "device_kind", str(device)),
            "device_count": jax.device_count(), "jax_version": jax.__version__}


@dataclasses.dataclass
class Measure:
    """`with Measure() as m: ...` then `m.as_dict()`: seconds and peak memories of the block.

    `reset_host=True` resets the host high-water mark at entry (see the module docstring).
    """

    reset_host: bool = True
    seconds: float | None = None
    host_peak_reset: bool = False
    host_rss_at_start_bytes: int | None = None
    host_peak_rss_bytes: int | None = None
    device_peak_bytes_before: int | None = None
    device_peak_bytes_after: int | None = None
    _start: float = 0.0

    def __enter__(self) -> "Measure":
        self.host_peak_reset = reset_host_peak() if self.reset_host else False
        self.host_rss_at_start_bytes = host_rss_bytes()
        self.device_peak_bytes_before = device_peak_bytes()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.host_peak_rss_bytes = host_peak_rss_bytes()
        self.device_peak_bytes_after = device_peak_bytes()

    @property
    def device_peak_is_phase_peak(self) -> bool | None:
        if self.device_peak_bytes_after is None:
            return None
        return (self.device_peak_bytes_before is None
                or self.device_peak_bytes_after > self.device_peak_bytes_before)

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "host_peak_rss_bytes": self.host_peak_rss_bytes,
                "host_peak_reset": self.host_peak_reset,
                "host_rss_at_start_bytes": self.host_rss_at_start_bytes,
                "device_peak_bytes_before": self.device_peak_bytes_before,
                "device_peak_bytes_after": self.device_peak_bytes_after,
                "device_peak_is_phase_peak": self.device_peak_is_phase_peak}


__all__ = ["Measure", "device_description", "device_memory_stats", "device_peak_bytes",
           "host_peak_rss_bytes", "host_rss_bytes", "reset_host_peak"]
