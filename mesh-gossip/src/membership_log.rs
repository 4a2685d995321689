//! What operators read about other hosts: one log line each time what membership says
//! about a host changes (joined, suspect, down, back, left), and nothing while it
//! stays the same. Pure: the table's owner feeds it the events gossip hands the table,
//! and logs and publishes what comes out.

use std::collections::BTreeMap;

use mesh_core::Delta;

use crate::events::GossipEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Alive,
    Suspect,
    Down,
    Left,
}

/// One line to log about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub host: String,
    /// A host that stopped answering is a warning; the rest is information.
    pub warn: bool,
    pub text: &'static str,
}

#[derive(Debug, Default)]
pub struct MembershipLog {
    /// What was last said about each host; as many entries as the cluster has hosts.
    last: BTreeMap<String, Seen>,
}

impl MembershipLog {
    /// The line `event` calls for, if it changes what is known about a host.
    pub fn observe(&mut self, event: &GossipEvent) -> Option<Line> {
        let (host, now) = match event {
            GossipEvent::MemberUp(h) => (h, Seen::Alive),
            GossipEvent::MemberSuspect(h) => (h, Seen::Suspect),
            GossipEvent::MemberDown(h) => (h, Seen::Down),
            GossipEvent::Delta(d) => match d.as_ref() {
                Delta::Leave { origin, .. } => (origin, Seen::Left),
                _ => return None,
            },
        };
        let before = self.last.insert(host.clone(), now);
        let (warn, text) = match (before, now) {
            (Some(b), n) if b == n => return None,
            // Membership declares a host that left down too; the leave said it all.
            (Some(Seen::Left), Seen::Down) => {
                self.last.insert(host.clone(), Seen::Left);
                return None;
            }
            (None, Seen::Alive) => (false, "joined the cluster"),
            (Some(Seen::Suspect), Seen::Alive) => {
                (false, "answers again: its tasks take connections again")
            }
            (Some(Seen::Down | Seen::Left), Seen::Alive) => {
                (false, "is back: its tasks take connections again")
            }
            (_, Seen::Suspect) => (
                true,
                "is suspect (it stopped answering probes): new connections avoid its tasks until it answers",
            ),
            (_, Seen::Down) => (true, "is down: its tasks are withdrawn"),
            (_, Seen::Left) => (false, "left the cluster: its tasks are withdrawn"),
            (Some(_), Seen::Alive) => return None,
        };
        Some(Line {
            host: host.clone(),
            warn,
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_change_of_what_membership_says() {
        let mut log = MembershipLog::default();
        let up = GossipEvent::MemberUp("h2".into());
        let suspect = GossipEvent::MemberSuspect("h2".into());
        let down = GossipEvent::MemberDown("h2".into());
        let leave = GossipEvent::Delta(Box::new(Delta::Leave {
            origin: "h2".into(),
            generation: 1,
        }));
        let said =
            |log: &mut MembershipLog, e: &GossipEvent| log.observe(e).map(|l| (l.warn, l.text));
        assert_eq!(said(&mut log, &up), Some((false, "joined the cluster")));
        assert_eq!(said(&mut log, &up), None, "nothing new");
        let (warn, text) = said(&mut log, &suspect).unwrap();
        assert!(warn && text.starts_with("is suspect"));
        assert!(said(&mut log, &up).unwrap().1.starts_with("answers again"));
        said(&mut log, &suspect);
        assert_eq!(
            said(&mut log, &down),
            Some((true, "is down: its tasks are withdrawn"))
        );
        assert_eq!(said(&mut log, &down), None);
        assert!(said(&mut log, &up).unwrap().1.starts_with("is back"));
        assert!(
            said(&mut log, &leave)
                .unwrap()
                .1
                .starts_with("left the cluster")
        );
        assert_eq!(
            said(&mut log, &down),
            None,
            "a host that left is not reported down"
        );
        assert!(said(&mut log, &up).unwrap().1.starts_with("is back"));
        assert_eq!(
            said(&mut log, &GossipEvent::MemberSuspect("h3".into())).map(|l| l.0),
            Some(true),
            "a host first heard of as suspect"
        );
    }
}
