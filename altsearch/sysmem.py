"""How much memory this process may still take without swapping or being killed, on Linux.

The system's figure (MemAvailable in /proc/meminfo) is the host's: in a container, or under a
systemd unit with MemoryMax, the control group's limit is the one that kills the process, and it can
be far below. Both are read, and the smaller wins. A group's headroom is its limit less what it uses
that cannot be reclaimed (its usage less its inactive file cache, as the kernel reclaims that first;
the "working set" of `docker stats` and the kubelet); under cgroup v2 every group from this process's
up to the root of the mount counts, as each enforces its own limit.
"""

from __future__ import annotations

from pathlib import Path

_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages)


def available_memory(proc: Path | str = "/proc") -> int | None:
    """Bytes this process may still allocate: the smaller of the system's MemAvailable and its
    control groups' headroom; None where neither is known (not Linux)."""
    proc = Path(proc)
    known = [n for n in (_meminfo_available(proc), _cgroup_available(proc)) if n is not None]
    return min(known) if known else None


def _meminfo_available(proc: Path) -> int | None:
    try:
        with open(proc / "meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(proc: Path) -> int | None:
    """The least headroom among this process's memory control groups (v2 and v1); None: no limit."""
    try:
        groups = (proc / "self" / "cgroup").read_text().splitlines()
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    headroom = []
    for line in groups:  # "hierarchy-id:controllers:path"
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            folder = _mounted(mounts, path, lambda fstype, options: fstype == "cgroup2")
            headroom += _v2_headroom(folder) if folder else []
        elif "memory" in controllers.split(","):
            folder = _mounted(mounts, path, lambda fstype, options: fstype == "cgroup" and "memory" in options)
            headroom += _v1_headroom(folder) if folder else []
    return min(headroom) if headroom else None


def _mounted(mounts: list[str], path: str, wanted) -> tuple[Path, Path] | None:
    """(mount point, the group's folder under it) of cgroup `path` in a hierarchy `wanted(fstype,
    super options)` accepts: mountinfo gives each mount's root within the hierarchy, which in a
    container is the container's own group (its /proc/self/cgroup may still name the host's path)."""
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        fields, rest = fields.split(), rest.split()
        if len(fields) < 5 or len(rest) < 3 or not wanted(rest[0], rest[2].split(",")):
            continue
        root, point = fields[3], Path(fields[4])
        if path == root or root == "/":
            relative = path.lstrip("/") if root == "/" else ""
        elif path.startswith(root.rstrip("/") + "/"):
            relative = path[len(root.rstrip("/")) + 1:]
        else:
            relative = ""  # a namespaced container: its root is its own group
        return point, point / relative
    return None


def _v2_headroom(where: tuple[Path, Path]) -> list[int]:
    point, folder = where
    headroom = []
    while True:
        limit = _read(folder / "memory.max")
        if limit not in (None, "max"):
            used = _read(folder / "memory.current")
            stat = _stat(folder / "memory.stat")
            if used is not None and used.isdigit():
                headroom.append(max(0, int(limit) - int(used) + stat.get("inactive_file", 0)))
        if folder == point or point not in folder.parents:
            return headroom
        folder = folder.parent


def _v1_headroom(where: tuple[Path, Path]) -> list[int]:
    _, folder = where
    stat = _stat(folder / "memory.stat")
    limit = stat.get("hierarchical_memory_limit")  # the least limit from this group up
    if limit is None:
        text = _read(folder / "memory.limit_in_bytes")
        limit = int(text) if text and text.isdigit() else None
    used = _read(folder / "memory.usage_in_bytes")
    if limit is None or limit >= _NO_LIMIT or not (used and used.isdigit()):
        return []
    return [max(0, limit - int(used) + stat.get("total_inactive_file", stat.get("inactive_file", 0)))]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path) -> dict[str, int]:
    stat = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat
