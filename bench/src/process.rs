//! Processes started inside a namespace, pinned to one CPU, stopped on drop, and the
//! CPU time they used, read from /proc.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use integration::netns::Netns;

/// `program args` in `ns`, pinned to `cpu`, with stderr (and stdout) to `log`.
pub fn pinned(ns: &Netns, cpu: &str, program: &str, args: &[&str]) -> Command {
    let mut c = ns.command("taskset");
    c.args(["-c", cpu, program]).args(args);
    c
}

pub struct Running {
    pub name: String,
    child: Child,
}

impl Running {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Running> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        // Dies with mesh-bench even when mesh-bench is killed and its drops never run.
        // Only from the main thread: the signal follows the thread that forked, and a
        // worker thread's end must not stop a process that outlives it.
        // SAFETY: getpid/gettid are async-signal-safe and touch no memory.
        let main_thread = unsafe { libc::getpid() == libc::gettid() };
        if main_thread {
            use std::os::unix::process::CommandExt;
            // SAFETY: as above.
            let parent = unsafe { libc::getpid() };
            // SAFETY: prctl, getppid and _exit are async-signal-safe; the closure
            // allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // mesh-bench died before the signal was armed: nobody would send it.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Running {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail when the process has already exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            bail!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// CPU seconds (user + system) of the process and its children, live ones included:
    /// nginx does its work in a worker.
    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self.pid())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM lets each program stop its workers and drain; SIGKILL after 5 s.
        // SAFETY: kill on a pid we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn own_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may hold spaces: ") S ppid ...".
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 here.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

pub fn tree_cpu_seconds(pid: u32) -> f64 {
    own_cpu_seconds(pid) + children(pid).into_iter().map(tree_cpu_seconds).sum::<f64>()
}
