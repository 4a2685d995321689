//! API write cost: how long `POST /v1/services` takes when the agent already holds
//! 100, 1,000 and 10,000 services. The issue's target is that a create at the largest
//! size costs no more than twice one at the smallest.
//!
//! One real `mesh agent` per size, each in its own temp dir with its API on a unix
//! socket, is filled through the API to its size (several connections at once, then
//! the last few one at a time on the timing connection; none of it timed). Then the
//! agents take turns: in each round every agent gets one create, timed from the first
//! byte of the request to the last byte of the 201 answer, on its keep-alive
//! connection. The timed creates stay in the tables.
//!
//! Why one agent per size, interleaved, rather than one agent grown from size to size:
//! once a write appends to a log instead of rewriting the state, a create is dominated
//! by the fsync in the agent's data dir, and on a shared VM that swings between about
//! 0.3 and 4 ms with whatever else the disk is doing.
//! Measured one size after the other, those swings landed on one size and not on
//! another: over three identical runs of the new store, the p50 ratio ranged from 0.9×
//! to 7× and the mean ratio from 0.4× to 1.6×. Taking turns spreads them over all
//! sizes alike, as the data-plane benchmark does with its targets; three runs then
//! gave 1.5–1.9× and 1.2–2.0×.
//!
//! The client is a minimal HTTP/1.1 client over std's `UnixStream`, not hyper: the
//! rest of mesh-bench is synchronous, hyper would add three dependencies (and a
//! runtime) to this crate for one request shape, and the agent's answers are small
//! JSON bodies with a Content-Length. Keep-alive keeps the connect and the agent's
//! per-connection setup out of the figure, so it is the write path that is timed.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::process::Running;
use crate::stats::{RunInfo, Spread};

/// Any single wait on an agent (connect, write, read, startup) longer than this
/// fails the run instead of hanging it. The old code took about 33 ms per create at
/// 2,000 services; 30 s is far beyond any create this benchmark should see.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The issue's target: largest-size cost ÷ smallest-size cost.
pub const RATIO_LIMIT: f64 = 2.0;

/// The last creates of each fill, made one at a time on the timing connection and
/// not timed; they count toward the size. Whatever the concurrent fill left queued in
/// the agent is worked off at the timed pace here, not on the first samples.
pub const WARMUP: usize = 10;

/// Longest unix socket path: `sun_path` is 108 bytes, NUL included.
const SUN_PATH_MAX: usize = 107;

pub struct Options {
    pub sizes: Vec<usize>,
    pub samples: usize,
    pub fill_connections: usize,
    pub mesh_bin: PathBuf,
}

/// Latency of the measured creates at one size, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub n: usize,
}

impl Latency {
    fn of(ms: &[f64]) -> Option<Latency> {
        let spread = Spread::of(ms)?;
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least p of the samples at or below it.
        let rank =
            |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Some(Latency {
            p50_ms: spread.median,
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            min_ms: spread.min,
            max_ms: spread.max,
            n: spread.n,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Services the agent held before its first timed create; it holds
    /// `services + samples` after the last.
    pub services: usize,
    pub create: Latency,
    /// Every timed create, in order, in ms: the outliers behind p99 and the mean.
    pub create_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiResults {
    pub run: RunInfo,
    pub samples: usize,
    pub fill_connections: usize,
    pub rows: Vec<Row>,
    /// Largest size's p50 ÷ smallest size's p50 (None with a single size).
    pub p50_ratio: Option<f64>,
    /// The same for the mean, which also carries work done every so many writes
    /// (compaction, a periodic full rewrite) when it falls among the samples.
    pub mean_ratio: Option<f64>,
}

impl ApiResults {
    /// Whether the issue's target holds: both ratios at most [`RATIO_LIMIT`].
    pub fn within_limit(&self) -> Option<bool> {
        Some(self.p50_ratio? <= RATIO_LIMIT && self.mean_ratio? <= RATIO_LIMIT)
    }
}

/// A name that is a valid DNS label (lowercase, digits, '-', leading letter), fixed
/// width so that names sort in creation order.
fn name(i: usize) -> String {
    format!("svc-{i:06}")
}

fn create_body(i: usize) -> String {
    // One unpublished port: nothing is bound on the host, so the figure is the
    // registry's write path, not the data plane's listeners.
    format!(r#"{{"name":"{}","ports":[{{"target":80}}]}}"#, name(i))
}

pub fn run(o: &Options) -> Result<ApiResults> {
    ensure!(!o.sizes.is_empty(), "--sizes needs at least one size");
    ensure!(o.samples >= 1, "--samples must be at least 1");
    ensure!(
        o.fill_connections >= 1,
        "--fill-connections must be at least 1"
    );
    ensure!(
        o.sizes.windows(2).all(|w| w[0] < w[1]),
        "--sizes must increase, smallest first: the ratio is the last over the first"
    );
    // Dropped on any return: each agent is stopped and its dir removed.
    let mut agents = Vec::with_capacity(o.sizes.len());
    for &size in &o.sizes {
        agents.push(start_and_fill(&o.mesh_bin, size, o.fill_connections)?);
    }
    // What the fills wrote goes to disk now, not under the timed creates' fsyncs.
    for agent in &agents {
        agent.sync_disk()?;
    }
    let mut conns = warm_up(&mut agents)?;
    let ms = time_in_turn(&mut agents, &mut conns, o.samples)?;
    let mut rows = Vec::with_capacity(agents.len());
    for (agent, ms) in agents.iter_mut().zip(ms) {
        // Every timed create landed.
        let held = agent.size + o.samples;
        agent.check(|a| a.expect_services(held))?;
        let create = Latency::of(&ms).context("no create was timed")?;
        eprintln!(
            "  api: at {}: p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
            agent.size, create.p50_ms, create.p99_ms, create.mean_ms
        );
        rows.push(Row {
            services: agent.size,
            create,
            create_ms: ms,
        });
    }
    let ratio = |f: fn(&Latency) -> f64| {
        let (first, last) = (rows.first()?, rows.last()?);
        (rows.len() > 1 && f(&first.create) > 0.0).then(|| f(&last.create) / f(&first.create))
    };
    Ok(ApiResults {
        run: RunInfo::collect(),
        samples: o.samples,
        fill_connections: o.fill_connections,
        p50_ratio: ratio(|l| l.p50_ms),
        mean_ratio: ratio(|l| l.mean_ms),
        rows,
    })
}

/// An agent filled to `size` less the [`WARMUP`] creates.
fn start_and_fill(mesh_bin: &Path, size: usize, connections: usize) -> Result<Agent> {
    let mut agent = Agent::start(mesh_bin, size)?;
    let started = Instant::now();
    let warm_from = size - WARMUP.min(size);
    agent.check(|a| {
        fill(&a.socket, 0..warm_from, connections)?;
        a.expect_services(warm_from)
    })?;
    eprintln!(
        "  api: {} filled in {:.1} s",
        agent.process.name,
        started.elapsed().as_secs_f64()
    );
    Ok(agent)
}

/// Opens the connection each agent's creates are timed on and makes the last
/// [`WARMUP`] creates of each fill on it, in turn like the timed ones. The agent
/// closes a keep-alive connection that stays idle for some seconds (10 s in its
/// header timeout); in turn, none waits longer than a round.
fn warm_up(agents: &mut [Agent]) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(agents.len());
    for agent in agents.iter_mut() {
        let mut conn = Conn::new(&agent.socket);
        agent.check(|_| conn.call("GET", "/healthz", ""))?;
        conns.push(conn);
    }
    for round in 0..WARMUP {
        for (agent, conn) in agents.iter_mut().zip(&mut conns) {
            let warm = WARMUP.min(agent.size);
            if round >= warm {
                continue;
            }
            let i = agent.size - warm + round;
            agent.check(|a| {
                let (status, answer) = conn.call("POST", "/v1/services", &create_body(i))?;
                expect_created(status, &answer, i, &a.socket)
            })?;
        }
    }
    for agent in agents.iter_mut() {
        let size = agent.size;
        agent.check(|a| a.expect_services(size))?;
    }
    Ok(conns)
}

/// `samples` rounds of one timed create on every agent: each agent's latencies in ms.
fn time_in_turn(agents: &mut [Agent], conns: &mut [Conn], samples: usize) -> Result<Vec<Vec<f64>>> {
    eprintln!(
        "  api: timing {samples} creates on each of {} agents, in turn",
        agents.len()
    );
    let mut ms = vec![Vec::with_capacity(samples); agents.len()];
    for round in 0..samples {
        for k in 0..agents.len() {
            // Each round starts with the next agent, so that none always follows the
            // same one.
            let a = (round + k) % agents.len();
            let (agent, conn) = (&mut agents[a], &mut conns[a]);
            let i = agent.size + round;
            let body = create_body(i);
            let took = agent.check(|ag| {
                let t = Instant::now();
                let (status, answer) = conn.call("POST", "/v1/services", &body)?;
                let took = t.elapsed();
                expect_created(status, &answer, i, &ag.socket)?;
                Ok(took)
            })?;
            ms[a].push(took.as_secs_f64() * 1000.0);
        }
    }
    Ok(ms)
}

fn expect_created(status: u16, answer: &str, i: usize, socket: &Path) -> Result<()> {
    if status != 201 {
        bail!(
            "POST /v1/services {} on unix:{} answered {status}, expected 201: {}",
            name(i),
            socket.display(),
            answer.trim()
        );
    }
    Ok(())
}

/// Creates services `range` (by index) over `connections` connections at once. The
/// fill is not measured: it only has to get to the size quickly, and the agent
/// serves each connection on its own task, so concurrent requests keep it busy
/// while the client parses answers.
fn fill(socket: &Path, range: std::ops::Range<usize>, connections: usize) -> Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let next = AtomicUsize::new(range.start);
    // Set by the first worker that fails, so that the others stop too.
    let failed = AtomicBool::new(false);
    // Progress only for fills long enough to wonder about.
    let step = (range.len() / 10).max(500);
    let worker = || -> Result<()> {
        let mut conn = Conn::new(socket);
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= range.end {
                break;
            }
            let answer = conn.call("POST", "/v1/services", &create_body(i));
            if let Err(e) =
                answer.and_then(|(status, body)| expect_created(status, &body, i, socket))
            {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
            let done = i + 1 - range.start;
            if done.is_multiple_of(step) {
                eprintln!("    filled {done}/{}", range.len());
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..connections).map(|_| s.spawn(worker)).collect();
        let mut first_error = None;
        for w in workers {
            let outcome = w
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a fill thread panicked")));
            if let (Err(e), None) = (outcome, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// One agent under test, in its own temp dir. Fields drop in order: the process is
/// stopped (SIGTERM, then SIGKILL after 5 s) before its directory is removed.
pub(crate) struct Agent {
    pub(crate) process: Running,
    /// The services it is filled to before timing.
    size: usize,
    log: PathBuf,
    pub(crate) socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(mesh_bin: &Path, size: usize) -> Result<Agent> {
        Self::start_with(mesh_bin, size, None)
    }

    /// An agent with `config` (TOML) as its config file, when given.
    pub(crate) fn start_with(mesh_bin: &Path, size: usize, config: Option<&str>) -> Result<Agent> {
        ensure!(
            mesh_bin.exists(),
            "{} not found; build it (cargo build --release -p mesh-agent) or pass --mesh",
            mesh_bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("mesh-bench-api-")
            .tempdir()
            .context("create a temp dir for the agent")?;
        let socket = dir.path().join("mesh.sock");
        ensure!(
            socket.as_os_str().len() <= SUN_PATH_MAX,
            "{} is too long for a unix socket path; set TMPDIR to a shorter directory",
            socket.display()
        );
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(mesh_bin);
        cmd.arg("agent")
            .arg("--api")
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // No VIPs on an interface and an ephemeral gossip port: no root needed, and
            // nothing clashes with the other agents or one already running here. No
            // --join: each agent is a cluster of one.
            .args(["--no-vips", "--bind", "127.0.0.1:0", "--node-name", "bench"])
            // Logging at info would time the agent's log writes as well.
            .env("RUST_LOG", "warn");
        if let Some(text) = config {
            let path = dir.path().join("mesh.toml");
            std::fs::write(&path, text).context("write the agent's config")?;
            cmd.arg("--config").arg(path);
        }
        let name = format!(
            "the mesh agent for {size} services ({})",
            mesh_bin.display()
        );
        let process = Running::spawn(&name, cmd, &log)?;
        let mut agent = Agent {
            process,
            size,
            log,
            socket,
            dir,
        };
        agent.wait_healthy()?;
        Ok(agent)
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.process.check_alive(&self.log)?;
            let answer = Conn::new(&self.socket).call("GET", "/healthz", "");
            match answer {
                Ok((200, _)) => return Ok(()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok((status, body)) => bail!(
                    "{}: GET /healthz on unix:{} answered {status}: {}",
                    self.process.name,
                    self.socket.display(),
                    body.trim()
                ),
                Err(e) => {
                    return Err(self.with_log(e.context(format!(
                        "no answer to GET /healthz on unix:{} within {} s",
                        self.socket.display(),
                        TIMEOUT.as_secs()
                    ))));
                }
            }
        }
    }

    /// Runs `f` on this agent; its error names the agent and says why the agent
    /// died, if it did, or else ends with the agent's log.
    fn check<T>(&mut self, f: impl FnOnce(&Agent) -> Result<T>) -> Result<T> {
        f(self).map_err(|e| self.explain(e))
    }

    /// Waits until GET /v1/status counts `n` services: every create so far was
    /// applied, so the next figure really is at `n`.
    fn expect_services(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let mut conn = Conn::new(&self.socket);
        loop {
            let (status, body) = conn.call("GET", "/v1/status", "")?;
            let v: serde_json::Value = serde_json::from_str(&body).with_context(|| {
                format!(
                    "GET /v1/status on unix:{}: {status} {body}",
                    self.socket.display()
                )
            })?;
            let held = v["services"].as_u64().with_context(|| {
                format!(
                    "GET /v1/status on unix:{} has no services count: {body}",
                    self.socket.display()
                )
            })?;
            if held == n as u64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} holds {held} services, expected {n}", self.process.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `syncfs` on the filesystem of the agent's data dir.
    fn sync_disk(&self) -> Result<()> {
        let dir = File::open(self.dir.path())
            .with_context(|| format!("open {}", self.dir.path().display()))?;
        // SAFETY: syncfs on a descriptor that stays open for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("syncfs {}", self.dir.path().display()));
        }
        Ok(())
    }

    /// The temp dir, and the log in it, is removed when the run ends: the error
    /// carries the log's tail instead, after the error itself.
    fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        if tail.is_empty() {
            return anyhow!(
                "{}: {e:#}\n(the agent logged nothing at RUST_LOG=warn)",
                self.process.name
            );
        }
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow!(
            "{}: {e:#}\nthe end of its log:\n{}",
            self.process.name,
            tail.join("\n")
        )
    }

    /// Adds why the agent stopped, if it did (with its log's tail), or else the tail.
    fn explain(&mut self, e: anyhow::Error) -> anyhow::Error {
        // A dying agent closes its sockets a moment before it can be reaped: give it
        // a second to show up as exited.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.process.check_alive(&self.log) {
                Err(died) => return anyhow!("{e:#}\n{died:#}"),
                Ok(()) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(()) => return self.with_log(e),
            }
        }
    }
}

/// One keep-alive HTTP/1.1 connection to the agent's unix socket, opened on first
/// use and again after the agent closes it.
pub(crate) struct Conn {
    socket: PathBuf,
    stream: Option<BufReader<UnixStream>>,
}

impl Conn {
    pub(crate) fn new(socket: &Path) -> Conn {
        Conn {
            socket: socket.to_path_buf(),
            stream: None,
        }
    }

    /// `method path` with a JSON `body`: (status, answer body). Every read and write
    /// gives up after [`TIMEOUT`].
    pub(crate) fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let socket = self.socket.display().to_string();
        let result = self.exchange(method, path, body);
        if result.is_err() {
            // The connection is in an unknown state; the next call opens a new one.
            self.stream = None;
        }
        result.map_err(|e| {
            let waited = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            });
            if waited {
                e.context(format!(
                    "{method} {path} on unix:{socket}: no answer within {} s",
                    TIMEOUT.as_secs()
                ))
            } else {
                e.context(format!("{method} {path} on unix:{socket}"))
            }
        })
    }

    fn exchange(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = UnixStream::connect(&self.socket).context("connect")?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_write_timeout(Some(TIMEOUT))?;
                self.stream.insert(BufReader::new(s))
            }
        };
        // Head and body in one write: one syscall, and the agent reads the whole request
        // at once.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: mesh\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.get_mut().write_all(request.as_bytes())?;

        let mut line = String::new();
        read_line(stream, &mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            read_line(stream, &mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((key, value)) = header.split_once(':') else {
                bail!("not an HTTP header: {header:?}");
            };
            let value = value.trim();
            match key.to_ascii_lowercase().as_str() {
                "content-length" => {
                    length = Some(value.parse::<usize>().context("Content-Length")?)
                }
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut answer = Vec::new();
        if status == 204 || status == 304 || (100..200).contains(&status) {
            // No body, whatever the headers say (RFC 9112 §6.3).
        } else if chunked {
            read_chunked(stream, &mut answer)?;
        } else if let Some(n) = length {
            answer.resize(n, 0);
            stream.read_exact(&mut answer)?;
        } else {
            // Neither: the body runs to the end of the connection.
            stream.read_to_end(&mut answer)?;
            close = true;
        }
        if close {
            self.stream = None;
        }
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }
}

/// A line of the answer's head; the end of the connection here is an error.
fn read_line(stream: &mut BufReader<UnixStream>, line: &mut String) -> Result<()> {
    if stream.read_line(line)? == 0 {
        bail!("the agent closed the connection before answering");
    }
    Ok(())
}

fn read_chunked(stream: &mut BufReader<UnixStream>, out: &mut Vec<u8>) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        read_line(stream, &mut line)?;
        let size = line.trim_end().split(';').next().unwrap_or("");
        let n = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {line:?}"))?;
        if n == 0 {
            // Trailers, if any, up to the empty line.
            loop {
                line.clear();
                read_line(stream, &mut line)?;
                if line.trim_end().is_empty() {
                    return Ok(());
                }
            }
        }
        let start = out.len();
        out.resize(start + n + 2, 0);
        stream.read_exact(&mut out[start..])?;
        out.truncate(start + n); // the chunk's CRLF
    }
}

/// The table printed to stdout.
pub fn print(r: &ApiResults) {
    println!(
        "POST /v1/services: {} timed creates per size, one agent per size, in turn (ms)",
        r.samples
    );
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "services", "p50", "p90", "p99", "mean", "max"
    );
    for row in &r.rows {
        let l = &row.create;
        println!(
            "{:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            row.services, l.p50_ms, l.p90_ms, l.p99_ms, l.mean_ms, l.max_ms
        );
    }
    if let (Some(p50), Some(mean), Some(met), Some(first), Some(last)) = (
        r.p50_ratio,
        r.mean_ratio,
        r.within_limit(),
        r.rows.first(),
        r.rows.last(),
    ) {
        println!(
            "{} ÷ {}: p50 {p50:.2}×, mean {mean:.2}× (target ≤ {RATIO_LIMIT}×: {})",
            last.services,
            first.services,
            if met { "met" } else { "not met" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Latency, name};

    #[test]
    fn names_are_dns_labels_in_creation_order() {
        let (a, b) = (name(99), name(100_000));
        assert_eq!(a, "svc-000099");
        assert!(a < name(100));
        for n in [a, b] {
            assert!(n.starts_with(|c: char| c.is_ascii_lowercase()));
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::of(&ms).unwrap();
        assert_eq!(
            (l.p90_ms, l.p99_ms, l.min_ms, l.max_ms),
            (90.0, 99.0, 1.0, 100.0)
        );
        assert_eq!((l.p50_ms, l.mean_ms, l.n), (50.5, 50.5, 100));
        let one = Latency::of(&[3.0]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
    }
}
