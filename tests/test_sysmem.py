"""The memory a process may still take: the host's MemAvailable, or a control group's headroom
where that is less (a container, a systemd unit with MemoryMax), read from fake /proc and cgroup
trees laid out as the kernel does."""

import os
from pathlib import Path

from altsearch.sysmem import available_memory

GB = 1 << 30


def _tree(tmp_path: Path, *, cgroup: str, mounts: list[str], meminfo_gb: float | None = 20) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    if meminfo_gb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       32000000 kB\nMemAvailable:   {int(meminfo_gb * GB) // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def _group(folder: Path, **files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_without_a_memory_limit_the_system_figure_is_used(tmp_path):
    sys_cg = tmp_path / "sys"
    proc = _tree(tmp_path, cgroup="4:memory:/user.slice\n0::/user.slice\n", mounts=[
        f"35 31 0:32 / {sys_cg}/memory rw,relatime - cgroup cgroup rw,memory",
        f"41 31 0:38 / {sys_cg}/unified rw,relatime - cgroup2 cgroup2 rw",  # hybrid: no memory controller here
    ])
    _group(sys_cg / "memory" / "user.slice", memory_limit_in_bytes="9223372036854771712",
           memory_usage_in_bytes=str(3 * GB),
           memory_stat="hierarchical_memory_limit 9223372036854771712\ntotal_inactive_file 0\n")
    _group(sys_cg / "unified" / "user.slice", cgroup_procs="1\n")
    assert available_memory(proc) == 20 * GB


def test_a_cgroup_v2_limit_below_the_hosts_memory_wins(tmp_path):
    """Every group from the process's up to the mount's root enforces its own memory.max: the least
    headroom counts, and inactive file cache (reclaimed first) is not counted as used."""
    point = tmp_path / "cgroup"
    proc = _tree(tmp_path, cgroup="0::/user.slice/app.service\n",
                 mounts=[f"30 23 0:26 / {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    _group(point, memory_stat="inactive_file 0\n")  # the root group has no memory.max
    _group(point / "user.slice", memory_max=str(8 * GB), memory_current=str(6 * GB),
           memory_stat=f"anon {5 * GB}\ninactive_file {1 * GB}\nactive_file 0\n")
    _group(point / "user.slice" / "app.service", memory_max="max", memory_current=str(2 * GB),
           memory_stat="inactive_file 0\n")
    assert available_memory(proc) == 3 * GB  # 8 - (6 - 1), less than the host's 20

    (point / "user.slice" / "app.service" / "memory.max").write_text(str(int(2.5 * GB)))
    assert available_memory(proc) == GB // 2  # the service's own limit is the tighter one now


def test_a_container_sees_its_own_group_as_the_root(tmp_path):
    """With a cgroup namespace the process's group is "/" and the mount's root is the container's
    group; without one (older Docker, cgroup v1) /proc/self/cgroup names the host's path, which is
    the mount's root."""
    point = tmp_path / "cgroup"
    proc = _tree(tmp_path, cgroup="0::/\n", mounts=[f"600 550 0:26 / {point} ro - cgroup2 cgroup2 rw"])
    _group(point, memory_max=str(2 * GB), memory_current=str(int(1.5 * GB)),
           memory_stat=f"inactive_file {GB // 4}\n")
    assert available_memory(proc) == 3 * GB // 4

    v1 = tmp_path / "v1"
    point = v1 / "sys" / "memory"
    proc = _tree(v1, cgroup="12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n", mounts=[
        f"700 650 0:40 /docker/abc {v1}/sys/cpu ro - cgroup cgroup rw,cpu,cpuacct",
        f"701 650 0:41 /docker/abc {point} ro - cgroup cgroup rw,memory",
    ])
    _group(point, memory_limit_in_bytes=str(8 * GB), memory_usage_in_bytes=str(2 * GB),
           memory_stat=f"hierarchical_memory_limit {4 * GB}\ntotal_inactive_file {GB // 2}\n")
    assert available_memory(proc) == 4 * GB - 2 * GB + GB // 2  # the least limit up the hierarchy


def test_unreadable_or_absent_figures_are_not_a_limit(tmp_path):
    assert available_memory(tmp_path / "nowhere") is None  # not Linux
    point = tmp_path / "cgroup"
    proc = _tree(tmp_path, cgroup="0::/app\n", mounts=[f"30 23 0:26 / {point} rw - cgroup2 cgroup2 rw"],
                 meminfo_gb=None)
    _group(point / "app", memory_max="max")
    assert available_memory(proc) is None
    _group(point / "app", memory_max=str(GB), memory_current="garbage")
    assert available_memory(proc) is None
    (point / "app" / "memory.current").write_text(str(2 * GB))  # over its limit (swapping): nothing left
    assert available_memory(proc) == 0


def test_this_machines_figure_is_bounded_by_its_physical_memory():
    available = available_memory()
    if not os.path.exists("/proc/meminfo"):
        assert available is None
        return
    assert 0 <= available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
