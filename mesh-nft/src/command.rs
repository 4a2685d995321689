//! Running a tool (`nft`, `conntrack`) with its input on stdin, a deadline, and an
//! error that names the tool, its arguments and what it printed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long one run may take before it is killed, plus [`PER_MB`] for each MB of
/// input: a table of 10,000 services is 8 MB, and nft parses it on one CPU that may
/// be busy.
const TIMEOUT: Duration = Duration::from_secs(60);
const PER_MB: Duration = Duration::from_secs(20);

/// The most of a tool's stderr kept in an error.
const MAX_ERROR: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source} (is its package installed?)")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("{program} {args} did not finish within {secs} s")]
    Timeout {
        program: PathBuf,
        args: String,
        secs: u64,
    },
    #[error("talking to {program}: {source}")]
    Io {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Cuts `text` to at most `max` bytes (at a character boundary), marking the cut.
pub(crate) fn cut_short(text: &mut String, max: usize) {
    if mesh_core::text::truncate_at_char(text, max) {
        text.push('…');
    }
}

/// A program, and what runs it (nothing, or `ip netns exec NS`).
#[derive(Debug, Clone)]
pub struct Program {
    program: PathBuf,
    leading: Vec<String>,
}

impl Program {
    pub fn new(program: &str) -> Self {
        Self {
            program: PathBuf::from(program),
            leading: Vec::new(),
        }
    }

    /// `program` run inside network namespace `ns`: for tests and tools that work on
    /// a namespace from outside it.
    pub fn in_netns(ns: &str, program: &str) -> Self {
        Self {
            program: PathBuf::from("ip"),
            leading: vec!["netns".into(), "exec".into(), ns.into(), program.into()],
        }
    }

    /// The network namespace it runs in, when it is run with `ip netns exec`.
    pub fn netns(&self) -> Option<&str> {
        match self.leading.as_slice() {
            [netns, exec, ns, ..] if netns == "netns" && exec == "exec" => Some(ns),
            _ => None,
        }
    }

    /// Another program, run the same way (in the same namespace).
    pub fn sibling(&self, program: &str) -> Self {
        match self.leading.split_last() {
            Some((_, leading)) => Self {
                program: self.program.clone(),
                leading: leading
                    .iter()
                    .cloned()
                    .chain([program.to_string()])
                    .collect(),
            },
            None => Self::new(program),
        }
    }

    /// Runs the program with `args` and `input` on stdin; returns stdout.
    pub async fn run(&self, args: &[&str], input: &str) -> Result<String, CommandError> {
        let limit = TIMEOUT + PER_MB.mul_f64(input.len() as f64 / 1e6);
        let joined = self
            .leading
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(&self.program)
            .args(&self.leading)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CommandError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.as_bytes().to_vec();
        let io = |source| CommandError::Io {
            program: self.program.clone(),
            source,
        };
        let work = async {
            // Written from its own task: nft may answer before it has read everything.
            let writer = tokio::spawn(async move {
                let r = stdin.write_all(&input).await;
                drop(stdin);
                r
            });
            let out = child.wait_with_output().await.map_err(io)?;
            let _ = writer.await;
            Ok::<_, CommandError>(out)
        };
        let out =
            tokio::time::timeout(limit, work)
                .await
                .map_err(|_| CommandError::Timeout {
                    program: self.program.clone(),
                    args: joined.clone(),
                    secs: limit.as_secs(),
                })??;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            cut_short(&mut stderr, MAX_ERROR);
            return Err(CommandError::Failed {
                program: self.program.clone(),
                args: joined,
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.leading.last() {
            Some(p) => f.write_str(p),
            None => write!(f, "{}", self.program.display()),
        }
    }
}
