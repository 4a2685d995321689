//! Running the `nft` binary, as kube-proxy does through knftables: the ruleset goes in
//! on stdin as one transaction, and `nft` reports errors with the line they are on.
//! Why the binary and not netlink from Rust: the text is what an operator reads in
//! `nft list table inet mesh`, errors come back in that language, and one `nft -f`
//! is one kernel transaction whatever its size.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long one `nft` run may take before it is killed: a 10,000-service table
/// loads in well under this.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The most of `nft`'s stderr kept in an error.
const MAX_ERROR: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program}: {source} (install the nftables package)")]
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

/// The `nft` program, and what runs it (nothing, or `ip netns exec NS`).
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
    leading: Vec<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Self {
            program: PathBuf::from("nft"),
            leading: Vec::new(),
        }
    }
}

impl Nft {
    /// `nft` run inside network namespace `ns`: for tests and tools that work on a
    /// namespace from outside it.
    pub fn in_netns(ns: &str) -> Self {
        Self {
            program: PathBuf::from("ip"),
            leading: vec!["netns".into(), "exec".into(), ns.into(), "nft".into()],
        }
    }

    /// Runs `nft ARGS` with `input` on stdin; returns stdout.
    pub async fn run(&self, args: &[&str], input: &str) -> Result<String, NftError> {
        let joined = args.join(" ");
        let mut child = Command::new(&self.program)
            .args(&self.leading)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| NftError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.as_bytes().to_vec();
        let io = |source| NftError::Io {
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
            Ok::<_, NftError>(out)
        };
        let out = tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| NftError::Timeout {
                program: self.program.clone(),
                args: joined.clone(),
                secs: TIMEOUT.as_secs(),
            })??;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if stderr.len() > MAX_ERROR {
                let cut = (0..=MAX_ERROR)
                    .rev()
                    .find(|i| stderr.is_char_boundary(*i))
                    .unwrap_or(0);
                stderr.truncate(cut);
                stderr.push('…');
            }
            return Err(NftError::Failed {
                program: self.program.clone(),
                args: joined,
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies a ruleset file's text in one transaction.
    pub async fn apply(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], ruleset).await.map(|_| ())
    }

    /// Whether `table inet NAME` exists.
    pub async fn has_table(&self, name: &str) -> Result<bool, NftError> {
        let out = self.run(&["list", "tables", "inet"], "").await?;
        Ok(out
            .lines()
            .any(|l| l.trim() == format!("table inet {name}")))
    }

    /// Removes `table inet NAME` if it exists.
    pub async fn delete_table(&self, name: &str) -> Result<(), NftError> {
        // Adding first makes the delete valid when there is no table.
        self.apply(&format!(
            "table inet {name} {{}}\ndelete table inet {name}\n"
        ))
        .await
    }
}
