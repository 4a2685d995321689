//! The one stable hash of mesh: FNV-1a, from the `fnv` crate. Hosts compare digests and
//! derive VIPs from it, so it must give the same value on every host, Rust version and
//! run, which `std`'s `DefaultHasher` does not promise.

use std::hash::Hasher;

use fnv::FnvHasher;

/// FNV-1a of `data`, continuing from `state` (a previous result, or [`START`]).
pub fn fnv1a_from(state: u64, data: &[u8]) -> u64 {
    let mut h = FnvHasher::with_key(state);
    h.write(data);
    h.finish()
}

/// FNV-1a's offset basis: the state before any byte.
pub const START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of `data`.
pub fn fnv1a(data: &[u8]) -> u64 {
    fnv1a_from(START, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_from(fnv1a(b"fo"), b"o"), fnv1a(b"foo"));
    }
}
