//! An accept for the mesh's connections in Docker's `DOCKER-USER` chain. Docker sets
//! the FORWARD policy to DROP, and a drop in any table's forward hook is final: an
//! accept in our own table cannot overrule it. So connections this plane DNATs to
//! another host (or to a container whose port Docker did not publish) would be
//! dropped on a Docker host. Docker's documented place for rules of one's own is
//! `DOCKER-USER`, which its FORWARD chain jumps to first; the one rule put there
//! accepts connections carrying [`FORWARD_MARK`] in their conntrack mark, which this
//! plane's DNAT rules set. Nothing else of Docker's is touched, and the rule is
//! removed at shutdown with the table.
//!
//! The rule goes in through Docker's own tool (`iptables`, `ip6tables`), since
//! Docker's tables are iptables' to parse; rules written there with `nft` could make
//! them unreadable to iptables-nft.

use tracing::{debug, info, warn};

use crate::command::Program;

/// The conntrack-mark bit of connections the plane DNATs.
pub const FORWARD_MARK: u32 = 0x0010_0000;

const CHAIN: &str = "DOCKER-USER";
/// Removal of duplicates left by older runs stops after this many.
const MAX_COPIES: usize = 8;

#[derive(Debug, Clone)]
pub struct ForwardAccept {
    tools: Vec<Program>,
    /// The tools whose `DOCKER-USER` has our rule, as last seen.
    installed: Vec<bool>,
}

fn rule() -> Vec<String> {
    [
        "-m",
        "connmark",
        "--mark",
        &format!("{FORWARD_MARK:#x}/{FORWARD_MARK:#x}"),
        "-m",
        "comment",
        "--comment",
        "mesh: forward connections the mesh balances",
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl ForwardAccept {
    /// The tools, run where `nft` runs (the same namespace).
    pub fn beside(nft: &Program) -> Self {
        let tools = vec![nft.sibling("iptables"), nft.sibling("ip6tables")];
        let installed = vec![false; tools.len()];
        Self { tools, installed }
    }

    /// Puts the rule first in `DOCKER-USER` wherever that chain exists and lacks it.
    /// Without Docker (no chain, or no tool) there is nothing to do.
    pub async fn ensure(&mut self) {
        for (i, tool) in self.tools.iter().enumerate() {
            if tool.run(&["-w", "5", "-S", CHAIN], "").await.is_err() {
                self.installed[i] = false;
                continue;
            }
            let mut check = vec!["-w".to_string(), "5".into(), "-C".into(), CHAIN.into()];
            check.extend(rule());
            if tool.run(&as_str(&check), "").await.is_ok() {
                self.installed[i] = true;
                continue;
            }
            let mut insert = vec![
                "-w".to_string(),
                "5".into(),
                "-I".into(),
                CHAIN.into(),
                "1".into(),
            ];
            insert.extend(rule());
            match tool.run(&as_str(&insert), "").await {
                Ok(_) => {
                    info!(chain = CHAIN, tool = %tool, "Docker drops forwarded traffic by default; the mesh's connections are accepted in DOCKER-USER");
                    self.installed[i] = true;
                }
                Err(e) => {
                    warn!(chain = CHAIN, error = %e, "cannot accept the mesh's connections in DOCKER-USER: Docker's FORWARD policy may drop what the mesh sends to other hosts");
                    self.installed[i] = false;
                }
            }
        }
    }

    /// Takes the rule out of every `DOCKER-USER` that has it.
    pub async fn remove(&mut self) {
        for (i, tool) in self.tools.iter().enumerate() {
            let mut delete = vec!["-w".to_string(), "5".into(), "-D".into(), CHAIN.into()];
            delete.extend(rule());
            for _ in 0..MAX_COPIES {
                if tool.run(&as_str(&delete), "").await.is_err() {
                    break;
                }
                debug!(chain = CHAIN, tool = %tool, "removed the mesh's accept");
            }
            self.installed[i] = false;
        }
    }

    /// Whether any `DOCKER-USER` holds the rule, for status.
    pub fn active(&self) -> bool {
        self.installed.iter().any(|i| *i)
    }
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
