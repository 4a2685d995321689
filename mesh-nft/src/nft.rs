//! The `nft` binary, as kube-proxy uses it through knftables: the ruleset goes in on
//! stdin as one transaction, and `nft` reports errors with the line they are on.
//! Why the binary and not netlink from Rust: the text is what an operator reads in
//! `nft list table inet mesh`, errors come back in that language, and one `nft -f`
//! is one kernel transaction whatever its size.

use crate::command::{CommandError, Program};

#[derive(Debug, Clone)]
pub struct Nft(Program);

impl Default for Nft {
    fn default() -> Self {
        Nft(Program::new("nft"))
    }
}

impl Nft {
    /// `nft` inside network namespace `ns`.
    pub fn in_netns(ns: &str) -> Self {
        Nft(Program::in_netns(ns, "nft"))
    }

    /// How `nft` is run, for tools that must run beside it (in its namespace).
    pub(crate) fn program(&self) -> &Program {
        &self.0
    }

    pub async fn run(&self, args: &[&str], input: &str) -> Result<String, CommandError> {
        self.0.run(args, input).await
    }

    /// Applies a ruleset file's text in one transaction.
    pub async fn apply(&self, ruleset: &str) -> Result<(), CommandError> {
        self.0.run(&["-f", "-"], ruleset).await.map(|_| ())
    }

    /// Whether `table inet NAME` exists.
    pub async fn has_table(&self, name: &str) -> Result<bool, CommandError> {
        let out = self.0.run(&["list", "tables", "inet"], "").await?;
        Ok(out
            .lines()
            .any(|l| l.trim() == format!("table inet {name}")))
    }

    /// Removes `table inet NAME` if it exists.
    pub async fn delete_table(&self, name: &str) -> Result<(), CommandError> {
        // Adding first makes the delete valid when there is no table.
        self.apply(&format!(
            "table inet {name} {{}}\ndelete table inet {name}\n"
        ))
        .await
    }
}
