//! The plaintext of a sync frame: the anti-entropy message, then what older releases
//! do not know about.
//!
//! ```text
//! postcard(message) ‖ postcard(Extension)    Extension = { versions: [VersionNote] }
//! ```
//!
//! Why a trailing extension rather than a new field in `Hello` or `Reply`: postcard is
//! not self-describing, so a new field would make every older peer fail to decode the
//! whole frame, and with it anti-entropy. But postcard's `from_bytes` stops after the
//! value it decodes and ignores the rest: a release without the extension reads the
//! message and skips it, and this release finds no extension in an older peer's frame
//! and learns nothing from it. A later release appends its own extension after this one
//! (or new fields at the end of `Extension`) in the same way. UDP gossip has no such
//! room: foca reads the bytes after its message as broadcasts, which older peers would
//! take for replica deltas.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::versions::{BadNote, VersionNote, check_notes};

#[derive(Serialize, Deserialize)]
struct Extension {
    versions: Vec<VersionNote>,
}

/// A decoded frame. A bad extension does not cost the message: anti-entropy goes on
/// without the versions, and `versions` says what was wrong with them.
pub struct Frame<T> {
    pub message: T,
    /// Empty for an older peer's frame.
    pub versions: Result<Vec<VersionNote>, BadNote>,
}

/// `message`, followed by `versions` unless there are none (then the frame is the
/// one older releases send).
pub fn encode<T: Serialize>(
    message: &T,
    versions: &[VersionNote],
) -> Result<Vec<u8>, postcard::Error> {
    let mut out = postcard::to_allocvec(message)?;
    if !versions.is_empty() {
        let ext = Extension {
            versions: versions.to_vec(),
        };
        out.extend(postcard::to_allocvec(&ext)?);
    }
    Ok(out)
}

/// Decodes a frame from this release or an older one; an undecodable message is an
/// error, a bad extension only drops the versions.
pub fn decode<T: DeserializeOwned>(plain: &[u8]) -> Result<Frame<T>, postcard::Error> {
    let (message, rest) = postcard::take_from_bytes::<T>(plain)?;
    let versions = if rest.is_empty() {
        Ok(Vec::new())
    } else {
        // Whatever follows the extension is a later release's: ignored.
        postcard::take_from_bytes::<Extension>(rest)
            .map_err(BadNote::from)
            .and_then(|(ext, _later)| check_notes(&ext.versions).map(|()| ext.versions))
    };
    Ok(Frame { message, versions })
}

#[cfg(test)]
mod tests {
    use mesh_core::{Replica, ReplicaConfig, VipPool};

    use super::*;
    use crate::anti_entropy::{self, Hello};
    use crate::versions::MAX_VERSION_LEN;

    fn hello() -> Hello {
        let replica = Replica::new("a", 1, VipPool::default(), ReplicaConfig::default());
        anti_entropy::hello(&replica, Vec::new())
    }

    fn note(version: &str) -> VersionNote {
        VersionNote {
            host: "a".into(),
            generation: 7,
            version: version.into(),
        }
    }

    fn digest(h: &Hello) -> Vec<u8> {
        postcard::to_allocvec(&h.digest).unwrap()
    }

    #[test]
    fn an_older_peers_frame_decodes_with_no_versions() {
        // What a release without versions sends: the bare message.
        let old = postcard::to_allocvec(&hello()).unwrap();
        let frame = decode::<Hello>(&old).unwrap();
        assert_eq!(digest(&frame.message), digest(&hello()));
        assert_eq!(frame.versions, Ok(Vec::new()));
        // And no versions to send is that same frame.
        assert_eq!(encode(&hello(), &[]).unwrap(), old);
    }

    #[test]
    fn an_older_peer_reads_the_message_of_a_frame_with_versions() {
        let new = encode(&hello(), &[note("0.2.0")]).unwrap();
        // An older release decodes with postcard::from_bytes::<Hello>, as sync.rs did.
        let seen_by_old: Hello = postcard::from_bytes(&new).unwrap();
        assert_eq!(digest(&seen_by_old), digest(&hello()));
        let frame = decode::<Hello>(&new).unwrap();
        assert_eq!(frame.versions, Ok(vec![note("0.2.0")]));
        // A later release's extension after ours is skipped.
        let later = [new, vec![3, 1, 2, 3]].concat();
        assert_eq!(
            decode::<Hello>(&later).unwrap().versions,
            Ok(vec![note("0.2.0")])
        );
    }

    #[test]
    fn bad_versions_are_refused_but_the_message_is_kept() {
        let long = "1".repeat(MAX_VERSION_LEN + 1);
        let junk = encode(&hello(), &[note(&long)]).unwrap();
        let frame = decode::<Hello>(&junk).unwrap();
        let e = frame.versions.unwrap_err();
        assert!(matches!(e, BadNote::Version { .. }), "{e}");
        assert!(e.to_string().contains("host \"a\""), "{e}");
        // A cut-off extension: an error, not a panic, and the message still arrives.
        let new = encode(&hello(), &[note("0.2.0")]).unwrap();
        let message_len = postcard::to_allocvec(&hello()).unwrap().len();
        for cut in message_len + 1..new.len() {
            let frame = decode::<Hello>(&new[..cut]).unwrap();
            assert!(
                matches!(frame.versions, Err(BadNote::Undecodable(_))),
                "cut at {cut}"
            );
        }
    }
}
