//! Harness for tests that run the real `mesh` binary, real backend processes and real
//! clients. Every process and directory is owned by a guard that cleans up on drop,
//! including after a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod docker;
pub mod ebpf;
pub mod load;
pub mod netns;
pub mod ports;
pub mod skip;

pub use netns::{Netns, is_root, skip_unless_root};
pub use serde_json::{Value, json};

/// A binary of this build (target/<profile>/NAME). Test executables live in
/// target/<profile>/deps, one level below.
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bins` (the README's test command does)",
        bin.display()
    );
    bin
}

/// The `mesh` binary: this build's, or `$MESH_BIN` (to run the tests against another
/// build, e.g. to see a regression test fail on the code before the fix).
pub fn mesh_bin() -> PathBuf {
    match std::env::var_os("MESH_BIN") {
        Some(path) => PathBuf::from(path),
        None => built("mesh"),
    }
}

/// The test backend binary.
pub fn backend_bin() -> PathBuf {
    built("mesh-test-backend")
}

/// Polls `cond` every 50 ms until it returns `Some`, failing after a generous deadline.
pub fn eventually<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port free a moment ago for UDP and TCP (see [`ports`]).
pub fn free_udp_port() -> u16 {
    ports::free_port()
}

pub use ports::free_port;

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `mesh agent` with its own socket and data directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
    netns: Option<String>,
    pub name: String,
    /// Arguments given at start, reused by every restart.
    base_args: Vec<String>,
    /// A command the agent runs under (e.g. `prlimit --nofile=256:256`).
    prefix: Vec<String>,
}

impl Agent {
    /// Starts an agent; `config` is written to a file and passed with --config.
    /// Starts an agent that leaves the host's interfaces alone (`--no-vips`).
    pub fn start(config: Option<&str>, args: &[&str]) -> Agent {
        // Gossip on a port of its own, so parallel tests never meet.
        let mut all = vec!["--no-vips", "--bind", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::start_with(None, config, &all)
    }

    /// Starts an agent named `name` (as [`Agent::start`]).
    pub fn start_named(name: &str, config: Option<&str>, args: &[&str]) -> Agent {
        let mut agent = Self::start_with_name(None, name);
        agent.base_args = ["--no-vips", "--bind", "127.0.0.1:0"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        agent.spawn(config, &[]);
        agent
    }

    /// Starts an agent inside `netns`, managing VIPs there.
    pub fn start_in(netns: &Netns, config: Option<&str>, args: &[&str]) -> Agent {
        Self::start_with(Some(netns), config, args)
    }

    /// Starts host `name` of a cluster inside `netns`.
    pub fn start_named_in(netns: &Netns, name: &str, config: Option<&str>, args: &[&str]) -> Agent {
        let mut agent = Self::start_with_name(Some(netns), name);
        agent.base_args = args.iter().map(|a| a.to_string()).collect();
        agent.spawn(config, &[]);
        agent
    }

    /// Starts host `name` inside `netns` through `nsenter --net`, which keeps the root
    /// mount namespace: bpffs and the cgroup hierarchy stay visible, and pins outlive
    /// the agent. For the eBPF plane.
    pub fn start_entered(netns: &Netns, name: &str, config: Option<&str>, args: &[&str]) -> Agent {
        let mut agent = Self::start_with_name(None, name);
        agent.prefix = vec!["nsenter".into(), format!("--net=/run/netns/{}", netns.name)];
        agent.base_args = args.iter().map(|a| a.to_string()).collect();
        agent.spawn(config, &[]);
        agent
    }

    fn start_with_name(netns: Option<&Netns>, name: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("mesh-it-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("mesh.sock");
        let data_dir = dir.path().join("data");
        Agent {
            dir,
            socket,
            data_dir,
            child: None,
            netns: netns.map(|n| n.name.clone()),
            name: name.into(),
            base_args: Vec::new(),
            prefix: Vec::new(),
        }
    }

    fn start_with(netns: Option<&Netns>, config: Option<&str>, args: &[&str]) -> Agent {
        let mut agent = Self::start_with_name(netns, "it");
        agent.base_args = args.iter().map(|a| a.to_string()).collect();
        agent.spawn(config, &[]);
        agent
    }

    /// Starts an agent (as [`Agent::start`]) under `prefix`, a command that runs it,
    /// such as `prlimit --nofile=256:256`.
    pub fn start_under(prefix: &[&str], config: Option<&str>, args: &[&str]) -> Agent {
        let mut agent = Self::start_with_name(None, "it");
        agent.prefix = prefix.iter().map(|a| a.to_string()).collect();
        agent.base_args = ["--no-vips", "--bind", "127.0.0.1:0"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        agent.spawn(config, &[]);
        agent
    }

    /// Starts host `name` on loopback under `prefix`, with only `args` (no
    /// `--bind`: the caller chooses the gossip address, which a restart keeps).
    pub fn start_named_under(
        prefix: &[&str],
        name: &str,
        config: Option<&str>,
        args: &[&str],
    ) -> Agent {
        let mut agent = Self::start_with_name(None, name);
        agent.prefix = prefix.iter().map(|a| a.to_string()).collect();
        agent.base_args = args.iter().map(|a| a.to_string()).collect();
        agent.spawn(config, &[]);
        agent
    }

    /// The command later starts run under (none: `&[]`).
    pub fn set_prefix(&mut self, prefix: &[&str]) {
        self.prefix = prefix.iter().map(|a| a.to_string()).collect();
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The value of a metric series from `/metrics`, 0 when absent. `labels` must
    /// all match.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Ok((_, text)) = self.try_http("GET", "/metrics", None) else {
            return 0.0;
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn spawn(&mut self, config: Option<&str>, args: &[&str]) {
        let mut program: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            program.extend(["ip", "netns", "exec", ns].map(Into::into));
        }
        program.extend(self.prefix.iter().map(Into::into));
        program.push(mesh_bin().into());
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..]);
        cmd.arg("agent")
            .arg("--api")
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--node-name")
            .arg(&self.name)
            .args(&self.base_args)
            .args(args)
            .env("RUST_LOG", "info,mesh_proxy=debug")
            .env_remove("MESH_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("agent.log")).unwrap());
        if let Some(text) = config {
            let path = self.dir.path().join("mesh.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        self.child = Some(cmd.spawn().expect("spawn mesh agent"));
        eventually("agent API answers /healthz", || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("agent exited with {status}; log:\n{}", self.log());
            }
            self.try_http("GET", "/healthz", None)
                .ok()
                .filter(|(s, _)| *s == 200)
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL: a crash, with no leave and no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        eventually("agent exits after SIGTERM", || {
            child.try_wait().ok().flatten()
        })
    }

    /// Runs `mesh ARGS` against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(mesh_bin())
            .arg("--api")
            .arg(format!("unix:{}", self.socket.display()))
            .args(args)
            .env_remove("MESH_API")
            .output()
            .expect("run mesh")
    }

    /// Runs `mesh ARGS --format json`, asserts success and parses the output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "mesh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "mesh {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        http_exchange(&mut s, method, path, body, None)
    }

    /// Task ids of `service` this agent routes new connections to: healthy, active,
    /// and on a live host. Empty when the API does not answer.
    pub fn routed(&self, service: &str) -> std::collections::BTreeSet<String> {
        let (status, tasks) = self.http("GET", &format!("/v1/services/{service}/tasks"), None);
        if status != 200 {
            return Default::default();
        }
        tasks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["health"] == "healthy" && t["state"] == "active" && t.get("suspended").is_none()
            })
            .map(|t| t["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// An API call over the unix socket: (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, text) = self.try_http(method, path, body).expect("API reachable");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Waits until `service` has `n` routable tasks and the data plane has applied
    /// that state.
    pub fn wait_routable(&self, service: &str, n: u64) {
        eventually(&format!("{service} has {n} routable tasks"), || {
            let (status, v) = self.http("GET", &format!("/v1/services/{service}"), None);
            (status == 200 && v["routable"] == n).then_some(())
        });
        self.wait_applied();
    }

    /// Waits until the data plane has applied the current snapshot.
    pub fn wait_applied(&self) {
        eventually("the data plane applied the latest snapshot", || {
            let (_, s) = self.http("GET", "/v1/status", None);
            (s["applied_snapshot"].as_u64()? >= s["snapshot"].as_u64()?).then_some(())
        });
    }

    pub fn task_health(&self, service: &str, id: &str) -> String {
        let (_, tasks) = self.http("GET", &format!("/v1/services/{service}/tasks"), None);
        tasks
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["id"] == id)
            .map(|t| t["health"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// A child process that is killed when the guard drops, so a failing test leaves
/// nothing running.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `mesh agent ARGS`, which is expected to refuse to start: returns its stderr.
/// An agent that starts instead fails the test (and is killed) after a generous
/// deadline, rather than hanging it.
pub fn agent_refuses(args: &[&str]) -> String {
    agent_refuses_with_env(args, &[])
}

/// [`agent_refuses`] with extra environment variables.
pub fn agent_refuses_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    refuses(Command::new(mesh_bin()), args, env)
}

/// [`agent_refuses`] inside network namespace `ns`.
pub fn agent_refuses_in(ns: &Netns, args: &[&str]) -> String {
    refuses(ns.command(mesh_bin()), args, &[])
}

/// As [`agent_refuses_in`], entering the namespace with `nsenter --net`, which keeps
/// the root mount namespace (bpffs, cgroups).
pub fn agent_refuses_entered(ns: &Netns, args: &[&str]) -> String {
    let mut mesh = ebpf::nsenter(ns);
    mesh.arg(mesh_bin());
    refuses(mesh, args, &[])
}

fn refuses(mut mesh: Command, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut child = ChildGuard(
        mesh.arg("agent")
            .args(args)
            .envs(env.iter().copied())
            .env_remove("MESH_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn mesh agent"),
    );
    let status = eventually(&format!("mesh agent {args:?} exits"), || {
        child.0.try_wait().ok().flatten()
    });
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(!status.success(), "mesh agent {args:?} started: {err}");
    err
}

/// One HTTP/1.1 request with `Connection: close`, returning (status, body).
pub fn http_exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: mesh\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET / through `port` on loopback; returns the body, or an error.
pub fn get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    http_exchange(&mut s, "GET", "/", None, None).map(|(_, b)| b.trim().to_string())
}

/// A backend process that answers with its name.
pub struct Backend {
    pub name: String,
    pub port: u16,
    child: Child,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::on_port(name, 0)
    }

    pub fn on_port(name: &str, port: u16) -> Backend {
        let mut cmd = Command::new(backend_bin());
        cmd.args([name, &port.to_string()]);
        Self::spawn(cmd, name)
    }

    /// A backend inside `netns`, on its loopback.
    pub fn start_in(netns: &Netns, name: &str) -> Backend {
        let mut cmd = netns.command(backend_bin());
        cmd.args([name, "0"]);
        Self::spawn(cmd, name)
    }

    /// Runs `cmd` (the backend with its arguments) and reads the port it bound.
    fn spawn(mut cmd: Command, name: &str) -> Backend {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn backend");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("backend {name} did not start: {line:?}"));
        Backend {
            name: name.into(),
            port,
            child,
        }
    }

    /// A backend inside `netns`, listening on `ip:port` (0: any port).
    pub fn start_in_at(netns: &Netns, name: &str, ip: &str, port: u16) -> Backend {
        let mut cmd = netns.command(backend_bin());
        cmd.args([name, &port.to_string(), ip]);
        Self::spawn(cmd, name)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A set of task ids, to compare with [`Agent::routed`].
pub fn ids(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Asserts that a CLI command succeeded, showing its stderr if not; returns its stdout.
pub fn assert_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A new cluster key from `mesh keygen`.
pub fn keygen() -> String {
    let out = Command::new(mesh_bin()).arg("keygen").output().unwrap();
    assert_ok(out).trim().to_string()
}
