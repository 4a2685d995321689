//! Network namespaces for tests that change addresses and routes. Names are unique
//! per test (`mesh-it-<pid>-<n>`); the namespace is deleted on drop, even after a
//! panic, and namespaces left by dead test processes are removed first.

use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "mesh-it-";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints why a test is skipped and returns true when it must be: tests that need
/// root never pass silently.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces, addresses); run the tests as root, as CI does"
    );
    true
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)")
}

fn remove_stale() {
    let list = String::from_utf8_lossy(&ip(&["netns", "list"]).stdout).to_string();
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
    {
        let pid = name[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static STALE: Once = Once::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        STALE.call_once(remove_stale);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        let out = ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` inside the namespace and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .expect("run in namespace");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A veth pair: `name` in this namespace, `peer_name` in `peer`. Both start down.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str) -> Result<(), String> {
        let out = ip(&[
            "-n", &self.name, "link", "add", name, "type", "veth", "peer", "name", peer_name,
            "netns", &peer.name,
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "veth {name} in {} to {peer_name} in {}: {}",
                self.name,
                peer.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The addresses on `lo` inside the namespace.
    pub fn lo_addresses(&self) -> String {
        String::from_utf8_lossy(&ip(&["-n", &self.name, "addr", "show", "dev", "lo"]).stdout)
            .to_string()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
