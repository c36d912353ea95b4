//! The memory and CPU limits of the cgroup this process runs in (cgroup v1 and v2).
//!
//! Parsing is pure (text in, values out); [`limits`] reads the files under a root
//! directory (normally `/`), so tests lay out a fake `/proc` and `/sys/fs/cgroup` in a temp
//! dir. The effective limit is the smallest over the cgroup and its ancestors, up to the
//! hierarchy's mount point.

use std::path::{Path, PathBuf};

/// What the cgroups this process is in allow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Bytes, if a memory limit applies.
    pub memory: Option<u64>,
    /// CPUs (quota / period), if a CPU quota applies.
    pub cpus: Option<f64>,
    /// 1 or 2 for the hierarchy the memory limit came from, None when no cgroup was found.
    pub version: Option<u8>,
}

/// A line of `/proc/self/cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Controllers (v1), empty for the v2 line ("0::/path").
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/self/cgroup`: "ID:controllers:path" per line.
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrl = it.next()?;
            let path = it.next()?;
            Some(Membership {
                controllers: ctrl
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The cgroup path that is the mount's root (not "/" inside some containers).
    pub root: String,
    pub mount_point: PathBuf,
    /// 2 for cgroup2, else 1.
    pub version: u8,
    /// v1 controllers from the super options.
    pub controllers: Vec<String>,
}

/// Parses the cgroup and cgroup2 mounts of `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let fstype = *post.first()?;
            let version = match fstype {
                "cgroup2" => 2,
                "cgroup" => 1,
                _ => return None,
            };
            let root = unescape(pre.get(3)?);
            let mount_point = PathBuf::from(unescape(pre.get(4)?));
            let controllers = if version == 1 {
                post.get(2)
                    .map(|o| o.split(',').map(String::from).collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            Some(Mount {
                root,
                mount_point,
                version,
                controllers,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// A memory limit file's value: v2 "max" or a number; v1 treats anything near 2^63 as
/// "no limit".
pub fn parse_memory_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    (v < (1u64 << 62)).then_some(v)
}

/// v2 `cpu.max`: "quota period" or "max period".
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let q: f64 = quota.parse().ok()?;
    Some(q / period)
}

/// The directory of a cgroup in a mount, from the membership path: the mount's root is
/// taken off it as whole path components (a root of `/docker/abc` leaves
/// `/docker/abcdef` alone).
fn cgroup_dir(m: &Mount, path: &str, root: &Path) -> PathBuf {
    let rel = Path::new(path)
        .strip_prefix(&m.root)
        .unwrap_or(Path::new(path.trim_start_matches('/')));
    let mp = m.mount_point.strip_prefix("/").unwrap_or(&m.mount_point);
    root.join(mp).join(rel)
}

/// The smallest value of `file` parsed with `parse` from `dir` up to `top` (inclusive).
fn min_up<T: PartialOrd + Copy>(
    dir: &Path,
    top: &Path,
    file: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    let mut best: Option<T> = None;
    let mut d = Some(dir);
    while let Some(cur) = d {
        if let Ok(text) = std::fs::read_to_string(cur.join(file))
            && let Some(v) = parse(&text)
        {
            best = Some(match best {
                Some(b) if b < v => b,
                _ => v,
            });
        }
        if cur == top || !cur.starts_with(top) {
            break;
        }
        d = cur.parent();
    }
    best
}

/// Reads the limits of this process's cgroups; `root` is "/" except in tests.
pub fn limits(root: &Path) -> Limits {
    let proc_cgroup = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let mountinfo = std::fs::read_to_string(root.join("proc/self/mountinfo")).unwrap_or_default();
    limits_from(
        &parse_proc_cgroup(&proc_cgroup),
        &parse_mountinfo(&mountinfo),
        root,
    )
}

/// [`limits`] from parsed memberships and mounts.
pub fn limits_from(members: &[Membership], mounts: &[Mount], root: &Path) -> Limits {
    let mut out = Limits::default();
    let top_of = |m: &Mount| {
        let mp = m.mount_point.strip_prefix("/").unwrap_or(&m.mount_point);
        root.join(mp)
    };
    // v1 controllers first: on hybrid hosts the v1 memory controller is the one in force.
    let v1 = |ctrl: &str| -> Option<(&Mount, &Membership)> {
        let mem = members
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == ctrl))?;
        let mount = mounts
            .iter()
            .find(|m| m.version == 1 && m.controllers.iter().any(|c| c == ctrl))?;
        Some((mount, mem))
    };
    if let Some((mount, mem)) = v1("memory") {
        let dir = cgroup_dir(mount, &mem.path, root);
        out.memory = min_up(
            &dir,
            &top_of(mount),
            "memory.limit_in_bytes",
            parse_memory_limit,
        );
        out.version = Some(1);
    }
    if let Some((mount, mem)) = v1("cpu") {
        let dir = cgroup_dir(mount, &mem.path, root);
        let quota = |d: &Path| -> Option<f64> {
            let q: i64 = std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let p: i64 = std::fs::read_to_string(d.join("cpu.cfs_period_us"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (q > 0 && p > 0).then(|| q as f64 / p as f64)
        };
        let top = top_of(mount);
        let mut d = Some(dir.as_path());
        while let Some(cur) = d {
            if let Some(v) = quota(cur) {
                out.cpus = Some(out.cpus.map_or(v, |b: f64| b.min(v)));
            }
            if cur == top || !cur.starts_with(&top) {
                break;
            }
            d = cur.parent();
        }
    }
    // v2: the "0::" line and a cgroup2 mount.
    let v2_member = members.iter().find(|m| m.controllers.is_empty());
    let v2_mount = mounts.iter().find(|m| m.version == 2);
    if let (Some(mem), Some(mount)) = (v2_member, v2_mount) {
        let dir = cgroup_dir(mount, &mem.path, root);
        let top = top_of(mount);
        if out.version.is_none() || out.memory.is_none() {
            let m = min_up(&dir, &top, "memory.max", parse_memory_limit);
            if m.is_some() || out.version.is_none() {
                out.memory = m;
                out.version = Some(2);
            }
        }
        if out.cpus.is_none() {
            out.cpus = min_up(&dir, &top, "cpu.max", parse_cpu_max);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn v2_limit_is_the_smallest_ancestor() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "proc/self/cgroup", "0::/system.slice/expertd.service\n");
        write(
            r,
            "proc/self/mountinfo",
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        write(
            r,
            "sys/fs/cgroup/system.slice/expertd.service/memory.max",
            "max\n",
        );
        write(r, "sys/fs/cgroup/system.slice/memory.max", "4294967296\n");
        write(
            r,
            "sys/fs/cgroup/system.slice/expertd.service/cpu.max",
            "150000 100000\n",
        );
        let l = limits(r);
        assert_eq!(l.memory, Some(4 << 30));
        assert_eq!(l.cpus, Some(1.5));
        assert_eq!(l.version, Some(2));
    }

    #[test]
    fn v1_limit_and_unlimited() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(
            r,
            "proc/self/cgroup",
            "4:memory:/job/a\n2:cpu,cpuacct:/job/a\n0::/\n",
        );
        write(
            r,
            "proc/self/mountinfo",
            "32 31 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        );
        write(
            r,
            "sys/fs/cgroup/memory/job/a/memory.limit_in_bytes",
            "2147483648\n",
        );
        write(
            r,
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(
            r,
            "sys/fs/cgroup/cpu,cpuacct/job/a/cpu.cfs_quota_us",
            "-1\n",
        );
        write(
            r,
            "sys/fs/cgroup/cpu,cpuacct/job/a/cpu.cfs_period_us",
            "100000\n",
        );
        let l = limits(r);
        assert_eq!(l.memory, Some(2 << 30));
        assert_eq!(l.cpus, None);
        assert_eq!(l.version, Some(1));
    }

    #[test]
    fn container_root_is_stripped() {
        let m = Mount {
            root: "/docker/abc".into(),
            mount_point: "/sys/fs/cgroup/memory".into(),
            version: 1,
            controllers: vec!["memory".into()],
        };
        assert_eq!(
            cgroup_dir(&m, "/docker/abc", Path::new("/")),
            Path::new("/sys/fs/cgroup/memory/")
        );
        assert_eq!(
            cgroup_dir(&m, "/docker/abc/inner", Path::new("/")),
            Path::new("/sys/fs/cgroup/memory/inner")
        );
        // another cgroup whose name starts like the root: not under it
        assert_eq!(
            cgroup_dir(&m, "/docker/abcdef", Path::new("/")),
            Path::new("/sys/fs/cgroup/memory/docker/abcdef")
        );
        let top = Mount {
            root: "/".into(),
            ..m
        };
        assert_eq!(
            cgroup_dir(&top, "/user.slice/a", Path::new("/r")),
            Path::new("/r/sys/fs/cgroup/memory/user.slice/a")
        );
    }
}
