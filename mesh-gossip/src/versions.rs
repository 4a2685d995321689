//! Which mesh release each host runs, so that a cluster half-way through an upgrade
//! shows it (`mesh node ls`). Hosts tell each other in their anti-entropy frames
//! (`transport::frame`): each sends every version it knows, its own included, so a
//! version reaches every host without each pair of hosts having to sync.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Longest version a host may claim: a semver with pre-release and build metadata
/// fits many times over.
pub const MAX_VERSION_LEN: usize = 64;
/// Most versions one frame may carry: a cluster's worth, bounded so that a peer
/// cannot make us keep an unbounded table.
pub const MAX_NOTES: usize = 4096;

/// "Host `host`, in its start `generation`, runs `version`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionNote {
    pub host: String,
    pub generation: u64,
    pub version: String,
}

/// A peer's version notes that are not what any release sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadNote {
    #[error("{count} host versions in one frame; at most {MAX_NOTES} are accepted")]
    TooMany { count: usize },
    #[error("host version: {0}")]
    Host(mesh_core::error::ModelError),
    #[error(
        "host {host:?} claims version {value:?}: expected 1 to {MAX_VERSION_LEN} of letters, digits, '.', '-', '+' and '_'"
    )]
    Version { host: String, value: String },
    #[error("undecodable host versions: {0}")]
    Undecodable(#[from] postcard::Error),
}

/// Checks a version string: what `CARGO_PKG_VERSION` can hold, and short.
pub fn check_version(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_VERSION_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
}

impl VersionNote {
    pub fn check(&self) -> Result<(), BadNote> {
        mesh_core::name::check_task_id("host", &self.host).map_err(BadNote::Host)?;
        if !check_version(&self.version) {
            // Quoted, and cut short: the value is a stranger's bytes.
            let value: String = self.version.chars().take(MAX_VERSION_LEN + 1).collect();
            return Err(BadNote::Version {
                host: self.host.clone(),
                value,
            });
        }
        Ok(())
    }
}

/// Checks a frame's notes as a whole: any bad one refuses them all, as a peer that
/// sends one is not to be believed about the rest.
pub fn check_notes(notes: &[VersionNote]) -> Result<(), BadNote> {
    if notes.len() > MAX_NOTES {
        return Err(BadNote::TooMany { count: notes.len() });
    }
    notes.iter().try_for_each(VersionNote::check)
}

/// The version of each host, as far as this host knows: per host, the note of its
/// latest start.
#[derive(Debug, Default)]
pub struct Versions {
    known: HashMap<String, (u64, String)>,
}

impl Versions {
    /// Takes a note unless one of a later start of the same host is known.
    pub fn learn(&mut self, note: VersionNote) {
        match self.known.get(&note.host) {
            Some((generation, _)) if *generation >= note.generation => {}
            _ => {
                self.known
                    .insert(note.host, (note.generation, note.version));
            }
        }
    }

    /// The version `host` runs in its start `generation`; `None` when only another
    /// start's version is known (the host restarted, perhaps upgraded, and no note
    /// of its new start has arrived yet).
    pub fn of(&self, host: &str, generation: u64) -> Option<&str> {
        self.known
            .get(host)
            .filter(|(g, _)| *g == generation)
            .map(|(_, v)| v.as_str())
    }

    /// Forgets the hosts `keep` refuses (those membership forgot).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.known.retain(|host, _| keep(host));
    }

    /// What to tell a peer: at most [`MAX_NOTES`] notes.
    pub fn notes(&self) -> Vec<VersionNote> {
        self.known
            .iter()
            .take(MAX_NOTES)
            .map(|(host, (generation, version))| VersionNote {
                host: host.clone(),
                generation: *generation,
                version: version.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(host: &str, generation: u64, version: &str) -> VersionNote {
        VersionNote {
            host: host.into(),
            generation,
            version: version.into(),
        }
    }

    #[test]
    fn the_latest_start_wins_and_an_older_starts_version_is_not_shown() {
        let mut v = Versions::default();
        v.learn(note("a", 2, "0.2.0"));
        v.learn(note("a", 1, "0.1.0"));
        assert_eq!(v.of("a", 2), Some("0.2.0"));
        // A's new start, whose version has not arrived yet: unknown, not 0.2.0.
        assert_eq!(v.of("a", 3), None);
        v.learn(note("a", 3, "0.3.0"));
        assert_eq!(v.of("a", 3), Some("0.3.0"));
        v.retain(|h| h != "a");
        assert!(v.notes().is_empty());
    }

    #[test]
    fn junk_is_refused_with_the_host_and_value_named() {
        assert_eq!(check_notes(&[note("a", 1, "0.1.0-rc.1+b7")]), Ok(()));
        let long = "9".repeat(MAX_VERSION_LEN + 1);
        for bad in ["", "1.0 beta", "1.0\n", "v1;rm", long.as_str()] {
            let e = check_notes(&[note("a", 1, bad)]).unwrap_err();
            assert!(
                matches!(&e, BadNote::Version { host, .. } if host == "a"),
                "{bad:?}: {e}"
            );
        }
        let e = check_notes(&[note("a/b", 1, "0.1.0")]).unwrap_err();
        assert!(e.to_string().contains("a/b"), "{e}");
        let many = vec![note("a", 1, "0.1.0"); MAX_NOTES + 1];
        assert_eq!(
            check_notes(&many),
            Err(BadNote::TooMany {
                count: MAX_NOTES + 1
            })
        );
    }
}
