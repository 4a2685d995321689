//! What the eBPF tests need besides a network namespace: a cgroup of their own, so
//! the socket programs act on the test's clients only (two tests that both name a
//! service `web` get the same VIP), and a bpffs pin directory of their own. Both are
//! named `mesh-it-<pid>-<n>`, removed on drop even after a panic, and those of dead
//! test processes are removed first.
//!
//! Agents and clients enter the namespace with `nsenter --net`, not `ip netns exec`:
//! the latter remounts /sys, which hides bpffs and the cgroup hierarchy.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::netns::{Netns, is_root};

const PREFIX: &str = "mesh-it-";
const BPFFS: &str = "/sys/fs/bpf";

/// Whether the `mesh` binary carries the eBPF programs (built with `--features
/// mesh-agent/ebpf`, as scripts/test-all.sh does).
fn mesh_has_ebpf() -> bool {
    Command::new(crate::mesh_bin())
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(", ebpf)"))
}

/// Prints why an eBPF test is skipped and returns true when it must be. With
/// `MESH_REQUIRE_EBPF=1` (CI as root) a skip is a failure instead.
pub fn skip_unless_ebpf(test: &str) -> bool {
    let why = if !is_root() {
        Some(
            "needs root (BPF programs, cgroups, network namespaces); run the tests as root, as CI does",
        )
    } else if !mesh_has_ebpf() {
        Some(
            "the mesh binary was built without the eBPF programs: build with `cargo build --bins --features mesh-agent/ebpf` (scripts/test-all.sh does)",
        )
    } else {
        None
    };
    why.is_some_and(|why| crate::skip::skip(test, "MESH_REQUIRE_EBPF", why))
}

fn unique() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn owner_is_dead(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// The root of the cgroup v2 hierarchy, mounted at /run/mesh/cgroup2 if none is, as
/// the agent finds it.
pub fn cgroup2_root() -> PathBuf {
    mesh_ebpf::mounts::cgroup(None).unwrap_or_else(|e| panic!("cgroup v2: {e}"))
}

/// A child cgroup of the v2 root for one test.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let root = cgroup2_root();
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(PREFIX) && owner_is_dead(&name) {
                    remove_cgroup(&root, &entry.path());
                }
            }
        });
        let path = root.join(unique());
        std::fs::create_dir(&path).expect("create the test cgroup");
        Cgroup { path }
    }

    /// Makes `cmd` start inside this cgroup: its sockets are the ones the programs
    /// act on.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .to_string_lossy()
                .into_owned(),
        )
        .unwrap();
        // SAFETY: only async-signal-safe calls (open, write, close) run in the child
        // between fork and exec, on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// `program` inside `ns` and this cgroup.
    pub fn command(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = nsenter(ns);
        cmd.arg(program);
        self.enter(&mut cmd);
        cmd
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills what is left in the cgroup, then removes it.
fn remove_cgroup(root: &Path, path: &Path) {
    for _ in 0..50 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines() {
            // Move it out first, so the directory can go even if it lingers.
            let _ = std::fs::write(root.join("cgroup.procs"), pid);
            let _ = Command::new("kill").args(["-9", pid]).output();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let root = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        remove_cgroup(&root, &self.path);
    }
}

/// `nsenter --net=/run/netns/NAME`, which keeps the root mount namespace.
pub fn nsenter(ns: &Netns) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name));
    cmd
}

/// A bpffs directory for one agent's pins. Dropping it removes the pins, which
/// detaches the programs a killed agent left.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        let path = Path::new(BPFFS).join(unique());
        // Mounts bpffs if needed, and makes the directory, as the agent would.
        mesh_ebpf::mounts::ensure_bpffs(&path).unwrap_or_else(|e| panic!("bpffs: {e}"));
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            for entry in std::fs::read_dir(BPFFS).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(PREFIX) && owner_is_dead(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        });
        PinDir { path }
    }

    /// What is pinned under the directory, as relative paths, sorted.
    pub fn contents(&self) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        walk(&self.path, &self.path, &mut out);
        out.sort();
        out
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The `[ebpf]` section for an agent attached to `cgroup` and pinning in `pins`.
pub fn config(cgroup: &Cgroup, pins: &PinDir) -> String {
    format!(
        "[ebpf]\ncgroup = \"{}\"\npin_dir = \"{}\"\n",
        cgroup.path.display(),
        pins.path.display()
    )
}

/// The packets `mesh_port_xdp` took (`ebpf.port_hook` "xdp"), summed over CPUs: its
/// pinned map under `pins`, read with bpftool, so the count is the kernel's of now
/// (`mesh status` gives it as of the last apply). Errors name what failed.
pub fn xdp_took(pins: &Path) -> Result<u64, String> {
    let map = pins
        .join(mesh_ebpf::programs::MAPS)
        .join("mesh_port_xdp_took");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .map_err(|e| format!("bpftool (apt-get install bpftool): {e}"))?;
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "bpftool map dump {}: {e}: {}",
            map.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let values = dump[0]["values"]
        .as_array()
        .ok_or_else(|| format!("no per-CPU values in {}: {dump}", map.display()))?;
    values.iter().try_fold(0u64, |sum, cpu| {
        counter(&cpu["value"])
            .map(|v| sum.wrapping_add(v))
            .ok_or_else(|| format!("a per-CPU value of {} is not a u64: {cpu}", map.display()))
    })
}

/// A u64 as bpftool prints it: a number where it found the map's BTF, else its
/// bytes in the host's order, as hex strings.
fn counter(value: &serde_json::Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let bytes: Vec<u8> = value
        .as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}
