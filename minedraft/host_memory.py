"""The host's free memory, read without torch (the model store runs before anything imports it)."""

from __future__ import annotations

from pathlib import Path


def mem_available() -> int:
    """The kernel's MemAvailable, in bytes: what new allocations can take without swapping."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def memory_free() -> int:
    """Bytes a new process may still take: MemAvailable, within a cgroup v2 memory limit if one is set."""
    free = mem_available()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return free
    return min(free, int(limit) - used) if limit.isdigit() else free
