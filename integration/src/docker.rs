//! A real, private Docker engine for tests: `dockerd` (with its own containerd) in a
//! network namespace, with its own data root, exec root and API socket under
//! `/tmp/mesh-dk-<pid>-<n>/`, and its containers in a cgroup of their own
//! (`mesh-dk-<pid>-<n>`). The host's Docker, if any, is never touched, and parallel
//! tests never share an engine.
//!
//! [`DockerHost`] is a guard: on drop, even after a panic, it removes every container,
//! stops dockerd, kills whatever containerd, shim or container process is left,
//! unmounts what Docker mounted under its directory, and deletes the directory and
//! the cgroups; an owned namespace then goes with its [`Netns`] guard. Engines left by
//! dead test processes are removed at first use.
//!
//! The image `mesh-test/busybox:1` ([`BUSYBOX_IMAGE`], built by
//! `scripts/busybox-image.sh` from the host's static busybox) is imported at start:
//! there is no registry.

use std::ffi::OsStr;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{Netns, is_root};

/// The image every [`DockerHost`] has: busybox with a symlink per applet and `/www`.
pub const BUSYBOX_IMAGE: &str = "mesh-test/busybox:1";

/// Directories are `/tmp/mesh-dk-<pid>-<n>`: short, because unix socket paths are
/// limited to 108 bytes and containerd puts its sockets under the exec root.
const PREFIX: &str = "mesh-dk-";

/// How long dockerd may take to answer, to stop, or a docker command to finish.
const DEADLINE: Duration = Duration::from_secs(60);

/// The docker CLI: Debian's (`/usr/bin/docker`, which matches its dockerd) rather than
/// whatever `docker` is first on PATH.
fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        debian.into()
    } else {
        which("docker").unwrap_or_else(|| "docker".into())
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `/usr/sbin/dockerd`, or `dockerd` on PATH.
fn dockerd_bin() -> Option<PathBuf> {
    let debian = Path::new("/usr/sbin/dockerd");
    if debian.exists() {
        Some(debian.into())
    } else {
        which("dockerd")
    }
}

/// Prints why a test is skipped and returns true when it must be: not root, or no
/// dockerd. Tests that need Docker never pass silently; and where
/// `MESH_REQUIRE_DOCKER=1` (CI's test command sets it), a skip is a failure.
pub fn skip_unless_docker(test: &str) -> bool {
    let why = if !is_root() {
        "needs root (dockerd, network namespaces); run the tests as root, as CI does"
    } else if dockerd_bin().is_none() {
        "no dockerd (/usr/sbin/dockerd or on PATH): install docker.io (scripts/test-all.sh does)"
    } else if !docker_cli().exists() {
        "no docker CLI: install docker.io (scripts/test-all.sh does)"
    } else {
        return false;
    };
    crate::skip::skip(test, "MESH_REQUIRE_DOCKER", why)
}

/// Runs `cmd` with its output captured, killing it after `deadline`: a wedged dockerd
/// fails the test instead of hanging it.
fn output_within(mut cmd: Command, deadline: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + deadline;
    let mut timed_out = false;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > end {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend(format!("\n(killed after {deadline:?}: {what})").bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Processes (other than this one) whose command line mentions `needle`.
fn pids_mentioning(needle: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// The cgroup directories named `name` in every hierarchy (v1 controllers and v2).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(name)];
    if let Ok(entries) = std::fs::read_dir(root) {
        dirs.extend(entries.flatten().map(|e| e.path().join(name)));
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// `dir` and every cgroup below it, deepest first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_tree(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// Processes in cgroup `name` or below, in any hierarchy.
fn pids_in_cgroup(name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(name)
        .iter()
        .flat_map(|d| cgroup_tree(d))
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(c) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(c);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn umount_detach(point: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(point.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: umount2 with a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
}

/// Everything an engine in `dir` (with containers in cgroup `cgroup`) may have left:
/// processes (dockerd, containerd, shims, containers), mounts, cgroups, the directory.
/// Returns what could not be cleaned, if anything.
fn clean(dir: &Path, cgroup: &str) -> Result<(), String> {
    let mut needle = dir.as_os_str().as_bytes().to_vec();
    needle.push(b'/');
    let end = Instant::now() + DEADLINE;
    loop {
        let mut pids = pids_mentioning(&needle);
        pids.extend(pids_in_cgroup(cgroup));
        if pids.is_empty() {
            break;
        }
        if Instant::now() > end {
            return Err(format!(
                "processes of {} survive SIGKILL: {pids:?}",
                dir.display()
            ));
        }
        for pid in pids {
            // SAFETY: kill(2); these are the engine's processes, which we own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stacked mounts need several rounds.
    for _ in 0..20 {
        let points = mounts_under(dir);
        if points.is_empty() {
            break;
        }
        for p in points {
            umount_detach(&p);
        }
    }
    let mut problems = Vec::new();
    let left = mounts_under(dir);
    if !left.is_empty() {
        problems.push(format!("mounts left: {left:?}"));
    }
    // A cgroup stays busy for a moment after its last process was killed.
    let end = Instant::now() + Duration::from_secs(10);
    for top in cgroup_dirs(cgroup) {
        for d in cgroup_tree(&top) {
            while let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > end {
                    problems.push(format!("rmdir {}: {e}", d.display()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(dir)
    {
        problems.push(format!("rm -r {}: {e}", dir.display()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Removes the engines of dead test processes: `/tmp/mesh-dk-<pid>-<n>` whose pid is
/// gone.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !pid_alive(p))
            && let Err(e) = clean(&e.path(), &name)
        {
            eprintln!("warning: stale Docker engine {name}: {e}");
        }
    }
}

/// A private Docker engine: `dockerd` in network namespace `ns`, API on `sock`,
/// everything else under `dir`.
pub struct DockerHost {
    /// The namespace dockerd and its containers' bridge (docker0, 172.17.0.1/16) live
    /// in. Owned (deleted after the engine on drop) for [`DockerHost::start`] and
    /// [`DockerHost::start_in`]; for [`DockerHost::start_in_existing`] a handle on the
    /// caller's namespace, which the caller keeps and deletes.
    pub ns: ManuallyDrop<Netns>,
    /// The API socket (`DOCKER_HOST=unix://<sock>`, see [`DockerHost::host_env`]).
    pub sock: PathBuf,
    /// `/tmp/mesh-dk-<pid>-<n>`: data root `data/`, exec root `exec/`, `dockerd.log`.
    pub dir: PathBuf,
    /// Also the cgroup parent of the containers and the containerd namespace.
    name: String,
    owns_ns: bool,
    dockerd_args: Vec<String>,
    child: Option<Child>,
}

impl DockerHost {
    /// An engine in a namespace of its own, with [`BUSYBOX_IMAGE`].
    pub fn start() -> DockerHost {
        Self::start_with(&[])
    }

    /// [`DockerHost::start`] with extra dockerd arguments (kept across restarts).
    pub fn start_with(dockerd_args: &[&str]) -> DockerHost {
        stale_once();
        Self::launch(ManuallyDrop::new(Netns::new()), true, dockerd_args)
    }

    /// An engine in `ns`, which it owns from now on (deleted after the engine).
    pub fn start_in(ns: Netns) -> DockerHost {
        Self::launch(ManuallyDrop::new(ns), true, &[])
    }

    /// An engine in a namespace the caller keeps, e.g. host `i` of a
    /// [`Cluster`](crate::cluster::Cluster): `DockerHost::start_in_existing(&c.hosts[i].ns)`.
    /// Declare it after the owner, so that it drops first. dockerd adds docker0 and
    /// its iptables rules there (FORWARD policy DROP, NAT) and turns on forwarding;
    /// docker0 and user networks are removed on drop, the iptables rules stay until
    /// the namespace goes. Pass `--iptables=false` with
    /// [`DockerHost::start_in_existing_with`] when they would get in the way.
    pub fn start_in_existing(ns: &Netns) -> DockerHost {
        Self::start_in_existing_with(ns, &[])
    }

    /// [`DockerHost::start_in_existing`] with extra dockerd arguments.
    pub fn start_in_existing_with(ns: &Netns, dockerd_args: &[&str]) -> DockerHost {
        // A second handle on the caller's namespace, never dropped: only the caller
        // deletes it.
        let handle = ManuallyDrop::new(Netns {
            name: ns.name.clone(),
        });
        Self::launch(handle, false, dockerd_args)
    }

    fn launch(ns: ManuallyDrop<Netns>, owns_ns: bool, dockerd_args: &[&str]) -> DockerHost {
        stale_once();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from("/tmp").join(&name);
        // A guard from here on: a failure below still cleans up.
        let mut host = DockerHost {
            ns,
            sock: dir.join("d.sock"),
            dir,
            name,
            owns_ns,
            dockerd_args: dockerd_args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        std::fs::create_dir(&host.dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", host.dir.display()));
        // Our own (empty) daemon.json: the host's /etc/docker/daemon.json is not ours.
        std::fs::write(host.dir.join("daemon.json"), "{}\n").unwrap();
        let t = Instant::now();
        host.start_daemon();
        eprintln!("dockerd {} ready in {:?}", host.name, t.elapsed());
        let t = Instant::now();
        host.import_busybox();
        eprintln!("{BUSYBOX_IMAGE} imported in {:?}", t.elapsed());
        host
    }

    /// `unix:///tmp/mesh-dk-…/d.sock`, for `DOCKER_HOST`.
    pub fn host_env(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// The dockerd log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// dockerd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A command (the docker CLI, with the environment of this engine only) to
    /// complete and run, e.g. with a working directory or stdin.
    pub fn docker_command(&self) -> Command {
        let mut c = Command::new(docker_cli());
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
        ] {
            c.env_remove(var);
        }
        c.env("DOCKER_HOST", self.host_env())
            .env("DOCKER_CONFIG", self.dir.join("cli"));
        c
    }

    /// Runs `docker ARGS` against this engine (killed after a minute).
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut c = self.docker_command();
        c.args(args);
        output_within(c, DEADLINE)
    }

    /// Runs `docker ARGS`, panicking with its stderr on failure; returns its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The address of container `name` on the default bridge, or else on its first
    /// network (by name). Panics when it has none (not running, `--network none`).
    pub fn container_ip(&self, name: &str) -> String {
        let out = self.docker_ok(&[
            "inspect",
            "-f",
            "{{range $n, $v := .NetworkSettings.Networks}}{{$n}} {{$v.IPAddress}}\n{{end}}",
            name,
        ]);
        let nets: Vec<(&str, &str)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, ip)| !ip.is_empty())
            .collect();
        nets.iter()
            .find(|(n, _)| *n == "bridge")
            .or(nets.first())
            .map(|(_, ip)| ip.to_string())
            .unwrap_or_else(|| panic!("container {name} has no address: {out:?}"))
    }

    /// A command that runs `program` in the engine's network namespace. Unlike
    /// `ip netns exec`, nsenter leaves /sys (and the cgroup mounts) alone.
    pub fn ns_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg(program);
        c
    }

    /// GET `url` from inside the namespace with `/usr/bin/busybox wget`, killed after
    /// 20 s (its own `-T` timeout segfaults in Debian's busybox-static): the body, or
    /// wget's error.
    pub fn wget(&self, url: &str) -> Result<String, String> {
        let mut c = self.ns_command("/usr/bin/busybox");
        c.args(["wget", "-q", "-O-", url]);
        let out = output_within(c, Duration::from_secs(20));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "wget {url}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Starts dockerd (again) with the same directories and arguments, and waits until
    /// its API answers.
    pub fn start_daemon(&mut self) {
        assert!(self.child.is_none(), "dockerd {} already runs", self.name);
        let dockerd = dockerd_bin().expect("dockerd (see skip_unless_docker)");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let path = format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin:{}",
            dockerd.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let d = &self.dir;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg(&dockerd)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("pid"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("-H")
            .arg(self.host_env())
            // Should dockerd find a system containerd and use it, its containers still
            // stay apart from everyone else's.
            .args(["--containerd-namespace", &self.name])
            .args(["--containerd-plugins-namespace", &format!("{}p", self.name)])
            // Containers in a cgroup of their own: cleanup finds every process.
            .args(["--cgroup-parent", &format!("/{}", self.name)])
            .args(&self.dockerd_args)
            .env("PATH", path)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // nsenter (with --net only) execs dockerd: the child is dockerd itself.
        self.child = Some(cmd.spawn().expect("spawn nsenter dockerd"));
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("dockerd exited with {status}; log:\n{}", self.log());
            }
            if self.ping() {
                break;
            }
            assert!(
                Instant::now() < end,
                "dockerd {} did not answer within {DEADLINE:?}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // And the CLI agrees.
        self.docker_ok(&["version", "--format", "{{.Server.Version}}"]);
    }

    /// True when the API answers `GET /_ping` with OK.
    fn ping(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.sock) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        matches!(crate::http_exchange(&mut s, "GET", "/_ping", None, None), Ok((200, b)) if b.trim() == "OK")
    }

    /// Stops dockerd: SIGTERM, then SIGKILL if it is still there after a minute.
    /// Without `--live-restore`, dockerd stops the running containers first (each
    /// gets its stop timeout, 10 s by default; a busybox PID 1 ignores SIGTERM).
    /// Containers that survive (live restore) keep running under their shims.
    pub fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) with the pid of our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > end {
                eprintln!(
                    "dockerd {} ignored SIGTERM for {DEADLINE:?}: SIGKILL",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // dockerd stops its containerd on the way out; wait for that too, so that a
        // restart finds its sockets free.
        let needle = self.dir.join("exec").join("containerd");
        let needle = needle.as_os_str().as_bytes();
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end
            && pids_mentioning(needle)
                .iter()
                .any(|&p| comm(p).is_some_and(|c| c == "containerd"))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn import_busybox(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("scripts")
            .join("busybox-image.sh");
        let mut c = Command::new("bash");
        c.arg(&script)
            .arg(BUSYBOX_IMAGE)
            .env("DOCKER_HOST", self.host_env())
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER", docker_cli())
            .env_remove("DOCKER_CONTEXT");
        let out = output_within(c, DEADLINE);
        assert!(
            out.status.success(),
            "{} {BUSYBOX_IMAGE}: {}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Removes every container and user network, while dockerd runs.
    fn remove_all(&self) {
        let ids = self.docker(&["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let out = self.docker(&args);
            if !out.status.success() {
                eprintln!(
                    "docker rm -f: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        if !self.owns_ns {
            let _ = self.docker(&["network", "prune", "-f"]);
        }
    }
}

/// A process's command name.
fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn stale_once() {
    static STALE: Once = Once::new();
    STALE.call_once(remove_stale);
}

impl Drop for DockerHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- dockerd {} log (last {} lines) ---",
                self.name,
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.child.is_some() {
            self.remove_all();
        }
        self.stop_daemon();
        if let Err(e) = clean(&self.dir, &self.name) {
            eprintln!("warning: cleaning up Docker engine {}: {e}", self.name);
        }
        if self.owns_ns {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.ns) };
        } else {
            // The caller's namespace: leave it as dockerd found it, but for the
            // iptables rules.
            let _ = Command::new("ip")
                .args(["-n", &self.ns.name, "link", "del", "docker0"])
                .stderr(Stdio::null())
                .status();
        }
    }
}
