//! A client that runs at a steady rate for the length of a scenario, in a namespace,
//! and the counts of what it saw. Every request is stamped with wall-clock time, so a
//! test can count failures before and after an event it timed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::netns::Netns;
use crate::{ChildGuard, backend_bin};

pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u128,
    pub ok: bool,
    /// The answer (the task's name), or why the request failed.
    pub what: String,
    pub latency_ms: u64,
}

pub struct Load {
    _child: ChildGuard,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a client saw in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: usize,
    pub failed: usize,
    /// Succeeded, but took a second or more (a connect retried after a timeout).
    pub slow: usize,
    /// The slowest request that succeeded, in ms.
    pub slowest_ms: u64,
}

impl Load {
    /// Starts `mesh-test-backend --load ADDR RATE KIND...` in `ns` (`kind`: empty for
    /// HTTP, `["udp"]` or `["dns", NAME]`).
    pub fn start(ns: &Netns, addr: &str, rate: u64, kind: &[&str]) -> Load {
        Self::start_with(ns.command(backend_bin()), addr, rate, kind)
    }

    /// As [`Load::start`], with `backend`: a command that runs `mesh-test-backend`
    /// where the test wants it (e.g. inside a cgroup).
    pub fn start_with(mut backend: Command, addr: &str, rate: u64, kind: &[&str]) -> Load {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("load.out");
        let child = backend
            .args(["--load", addr, &rate.to_string()])
            .args(kind)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the load");
        Load {
            _child: ChildGuard(child),
            out,
            _dir: dir,
        }
    }

    fn lines(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// What was seen so far (requests still in flight are not in it).
    pub fn samples(&self) -> Vec<Sample> {
        self.lines()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let at_ms = f.next()?.parse().ok()?;
                let ok = match f.next()? {
                    "ok" => true,
                    "fail" => false,
                    _ => return None,
                };
                Some(Sample {
                    at_ms,
                    ok,
                    what: f.next()?.to_string(),
                    latency_ms: f.next()?.parse().ok()?,
                })
            })
            .collect()
    }

    /// Requests sent in `[from, to)` that have not ended yet.
    pub fn unfinished(&self, from: u128, to: u128) -> Vec<u64> {
        let text = self.lines();
        let mut sent = std::collections::BTreeSet::new();
        let mut ended = std::collections::BTreeSet::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                [at, "sent", n] => {
                    if let (Ok(at), Ok(n)) = (at.parse::<u128>(), n.parse::<u64>())
                        && at >= from
                        && at < to
                    {
                        sent.insert(n);
                    }
                }
                [_, _, _, _, n] => {
                    if let Ok(n) = n.parse::<u64>() {
                        ended.insert(n);
                    }
                }
                _ => {}
            }
        }
        sent.difference(&ended).copied().collect()
    }

    /// Waits until every request sent in `[from, to)` has ended (the client gives
    /// up on one after a minute), so a count of the window misses none. Panics,
    /// naming them, if some never end.
    pub fn settle(&self, from: u128, to: u128) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let open = self.unfinished(from, to);
            if open.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "requests {open:?} sent in the window never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// Requests sent in `[from, to)` (wall-clock ms).
pub fn count(samples: &[Sample], from: u128, to: u128) -> Counts {
    let window = samples.iter().filter(|s| s.at_ms >= from && s.at_ms < to);
    let mut c = Counts::default();
    for s in window {
        c.requests += 1;
        if !s.ok {
            c.failed += 1;
        } else {
            if s.latency_ms >= 1000 {
                c.slow += 1;
            }
            c.slowest_ms = c.slowest_ms.max(s.latency_ms);
        }
    }
    c
}

/// Why the requests sent in `[from, to)` failed, with when they were sent: for
/// assertion messages.
pub fn failures(samples: &[Sample], from: u128, to: u128) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.at_ms >= from && s.at_ms < to && !s.ok)
        .map(|s| format!("{} at {} after {} ms", s.what, s.at_ms, s.latency_ms))
        .collect()
}

/// An established connection through `addr`, held across an event: started by
/// [`Held::open`] (returns once the connection is up and its request begun), it sends
/// the rest of its request `secs` later. [`Held::outcome`] is `Ok(answer)` or
/// `Err(why)`.
pub struct Held {
    child: ChildGuard,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Held {
    pub fn open(ns: &Netns, addr: &str, secs: u64) -> Held {
        Self::start(ns, addr, &secs.to_string(), Stdio::null())
    }

    /// As [`Held::open`], but the rest of the request waits for [`Held::go`].
    pub fn open_until_go(ns: &Netns, addr: &str) -> Held {
        Self::start(ns, addr, "stdin", Stdio::piped())
    }

    /// Sends the rest of the request of a connection opened with [`Held::open_until_go`].
    pub fn go(&mut self) {
        use std::io::Write;
        let stdin = self
            .child
            .0
            .stdin
            .as_mut()
            .expect("opened with open_until_go");
        stdin.write_all(b"go\n").expect("cue the held connection");
    }

    /// As [`Held::open_until_go`], with `backend`: a command that runs
    /// `mesh-test-backend` where the test wants it.
    pub fn open_until_go_with(backend: Command, addr: &str) -> Held {
        Self::start_with(backend, addr, "stdin", Stdio::piped())
    }

    fn start(ns: &Netns, addr: &str, cue: &str, stdin: Stdio) -> Held {
        Self::start_with(ns.command(backend_bin()), addr, cue, stdin)
    }

    fn start_with(mut backend: Command, addr: &str, cue: &str, stdin: Stdio) -> Held {
        use std::io::BufRead;
        let mut child = backend
            .args(["--held", addr, cue])
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a held connection");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let child = ChildGuard(child);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        assert_eq!(line.trim(), "connected", "the held connection did not open");
        Held { child, stdout }
    }

    pub fn outcome(mut self) -> Result<String, String> {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let _ = self.child.0.wait();
        match line.trim().split_once(' ') {
            Some(("ok", answer)) => Ok(answer.to_string()),
            Some((_, why)) => Err(why.to_string()),
            None => Err("no-outcome".into()),
        }
    }
}

/// Runs `program args` in `ns` in the background, killed when the guard drops.
pub fn spawn_in(ns: &Netns, program: &str, args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}")),
    )
}
