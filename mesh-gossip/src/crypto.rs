//! Encryption and authentication of every gossip datagram and sync frame: AEAD
//! (ChaCha20-Poly1305) under a shared cluster key, with the cluster name as associated
//! data, so a packet from another cluster or with another key is rejected.
//!
//! A keyring rotates keys without downtime: packets are sealed with the primary (the
//! first) key and opened with any key of the ring. Roll a new key out as a secondary
//! everywhere, then make it primary, then drop the old one.
//!
//! The envelope's first byte also carries the protocol version ([`PROTOCOL`]). The
//! encoding (postcard) is not self-describing, so a host of another version would
//! misread records, or fail on whole batches of them; it is refused instead, with a
//! message that says so.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// The version of what gossip carries. Bumped whenever a record's encoding changes
/// (the task's `source` and `observed` fields made it 2; hosts before it sent 0).
pub const PROTOCOL: u8 = 2;
/// The envelope's first byte: the version, and whether the rest is sealed.
const SEALED: u8 = PROTOCOL << 1 | 1;
const PLAIN: u8 = PROTOCOL << 1;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("not encrypted, but this cluster requires its key")]
    Unencrypted,
    #[error("encrypted, but this agent has no cluster key")]
    NoKey,
    #[error("authentication failed: another cluster key or cluster name")]
    Auth,
    #[error("malformed envelope")]
    Malformed,
    #[error(
        "the peer speaks gossip protocol {peer}, this host {PROTOCOL}: run one mesh version on every host (upgrade the others)"
    )]
    Version { peer: u8 },
}

#[derive(Debug, thiserror::Error)]
#[error("cluster key {index}: {reason}")]
pub struct KeyError {
    pub index: usize,
    pub reason: String,
}

/// The keys of a cluster, or none (plaintext, for loopback and `--insecure`).
#[derive(Clone)]
pub struct Keyring {
    ciphers: Vec<ChaCha20Poly1305>,
    cluster: Vec<u8>,
}

/// A new random key, base64, for `mesh keygen`.
pub fn generate_key() -> String {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS random source");
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl Keyring {
    /// `keys` are base64 32-byte keys, primary first; empty means no encryption.
    pub fn new(cluster: &str, keys: &[String]) -> Result<Self, KeyError> {
        let mut ciphers = Vec::new();
        for (index, k) in keys.iter().enumerate() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(k.trim())
                .map_err(|e| KeyError {
                    index,
                    reason: format!("not base64 ({e}); make one with `mesh keygen`"),
                })?;
            if bytes.len() != 32 {
                return Err(KeyError {
                    index,
                    reason: format!("{} bytes; a key is 32 bytes (`mesh keygen`)", bytes.len()),
                });
            }
            ciphers.push(ChaCha20Poly1305::new(Key::from_slice(&bytes)));
        }
        Ok(Self {
            ciphers,
            cluster: cluster.as_bytes().to_vec(),
        })
    }

    pub fn is_encrypted(&self) -> bool {
        !self.ciphers.is_empty()
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let Some(primary) = self.ciphers.first() else {
            let mut out = Vec::with_capacity(plain.len() + 1);
            out.push(PLAIN);
            out.extend_from_slice(plain);
            return out;
        };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source");
        let sealed = primary
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &self.cluster,
                },
            )
            .expect("encryption of a bounded message");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, data: &[u8]) -> Result<Vec<u8>, OpenError> {
        if let Some(first) = data.first()
            && first >> 1 != PROTOCOL
        {
            return Err(OpenError::Version { peer: first >> 1 });
        }
        match data.first() {
            Some(&PLAIN) if self.ciphers.is_empty() => Ok(data[1..].to_vec()),
            Some(&PLAIN) => Err(OpenError::Unencrypted),
            Some(&SEALED) if self.ciphers.is_empty() => Err(OpenError::NoKey),
            Some(&SEALED) if data.len() > 1 + NONCE_LEN => {
                let nonce = Nonce::from_slice(&data[1..1 + NONCE_LEN]);
                let msg = &data[1 + NONCE_LEN..];
                self.ciphers
                    .iter()
                    .find_map(|c| {
                        c.decrypt(
                            nonce,
                            Payload {
                                msg,
                                aad: &self.cluster,
                            },
                        )
                        .ok()
                    })
                    .ok_or(OpenError::Auth)
            }
            _ => Err(OpenError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_rotate_and_reject() {
        let (k1, k2) = (generate_key(), generate_key());
        let old = Keyring::new("prod", std::slice::from_ref(&k1)).unwrap();
        let rotating = Keyring::new("prod", &[k2.clone(), k1.clone()]).unwrap();
        let new = Keyring::new("prod", std::slice::from_ref(&k2)).unwrap();
        let msg = b"hello";
        assert_eq!(
            rotating.open(&old.seal(msg)).unwrap(),
            msg,
            "accepts with any key"
        );
        assert_eq!(
            new.open(&rotating.seal(msg)).unwrap(),
            msg,
            "sends with the primary"
        );
        assert_eq!(old.open(&new.seal(msg)), Err(OpenError::Auth));
        let other_cluster = Keyring::new("staging", std::slice::from_ref(&k1)).unwrap();
        assert_eq!(
            other_cluster.open(&old.seal(msg)),
            Err(OpenError::Auth),
            "the cluster name is bound in"
        );
        let plain = Keyring::new("prod", &[]).unwrap();
        assert_eq!(plain.open(&old.seal(msg)), Err(OpenError::NoKey));
        assert_eq!(old.open(&plain.seal(msg)), Err(OpenError::Unencrypted));
        assert_eq!(old.open(&[SEALED, 2, 3]), Err(OpenError::Malformed));
        // A host of the version before sent 0 (plain) or 1 (sealed).
        for byte in [0u8, 1] {
            let mut before = old.seal(msg);
            before[0] = byte;
            let e = old.open(&before).unwrap_err();
            assert_eq!(e, OpenError::Version { peer: 0 });
            assert!(e.to_string().contains("protocol 0, this host 2"), "{e}");
        }
        let mut tampered = old.seal(msg);
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(old.open(&tampered), Err(OpenError::Auth));
        let err = Keyring::new("prod", &["short".into()])
            .err()
            .expect("a bad key is refused");
        assert!(err.to_string().contains("key 0"), "{err}");
    }
}
