//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4): a lookup table of a
//! prime size M in which every backend owns M/N entries, give or take one. A flow's
//! hash picks an entry. Two properties make it the choice for published ports in a
//! kernel plane:
//! - every host that builds the table from the same backends gets the same table, so
//!   a flow that reaches another host (a restart, an ECMP change) finds the same task
//!   without any shared connection state;
//! - when a backend leaves, the entries it owned move and few others do: the flows of
//!   the other backends keep their task even where the flow map lost them.
//!
//! Written here rather than taken from a crate: the `maglev` crate (0.2.1, last
//! released in 2021) hashes with `std`'s `DefaultHasher` unless given another, and
//! fills the table in the caller's order of backends; both would have to be undone to
//! get one table on every host. The algorithm itself is twenty lines.

use crate::hash::fnv1a_from;

/// Cilium's default size: prime, and over 100 × N up to 163 backends, where a change
/// of one backend moves about 1% of the other backends' entries.
pub const DEFAULT_SIZE: u32 = 16_381;

/// The two hashes of a backend's permutation; any two fixed, different states.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031;
const SKIP_SEED: u64 = 0x6d61_676c_6576_3032;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("a Maglev table's size must be a prime, not {0}")]
    NotPrime(u32),
    #[error("a Maglev table of {size} entries cannot hold {backends} backends")]
    TooManyBackends { size: u32, backends: usize },
}

/// The table for `keys` (each backend's stable name, the same on every host): entry
/// `i` is the index in `keys` of the backend that owns it. The order of `keys` does
/// not matter; equal keys are taken in turn. Empty when `keys` is.
pub fn table(keys: &[&[u8]], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if keys.len() > size as usize {
        return Err(MaglevError::TooManyBackends {
            size,
            backends: keys.len(),
        });
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Backends take turns in a fixed order, so the order is the keys', not the
    // caller's: hosts that list the same tasks differently build the same table.
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|a, b| keys[*a].cmp(keys[*b]));
    let m = u64::from(size);
    // (next position in the permutation, offset, skip) per backend, in `order`.
    let mut walks: Vec<(u64, u64, u64)> = order
        .iter()
        .map(|i| {
            let key = keys[*i];
            let offset = fnv1a_from(OFFSET_SEED, key) % m;
            let skip = fnv1a_from(SKIP_SEED, key) % (m - 1) + 1;
            (0, offset, skip)
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut entries = vec![EMPTY; size as usize];
    let mut filled = 0usize;
    // Each round gives every backend its next preferred free entry; a permutation of a
    // prime modulus visits every entry, so each walk ends within M steps.
    'fill: loop {
        for (turn, walk) in walks.iter_mut().enumerate() {
            loop {
                let (next, offset, skip) = *walk;
                let at = ((offset + next * skip) % m) as usize;
                walk.0 = next + 1;
                if entries[at] == EMPTY {
                    entries[at] = order[turn] as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == entries.len() {
                break 'fill;
            }
        }
    }
    Ok(entries)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("web.{i}@10.0.{}.{}:80", i / 250, i % 250 + 1))
            .collect()
    }

    fn build(keys: &[String], size: u32) -> Vec<u32> {
        let k: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        table(&k, size).expect("a table")
    }

    /// The table as owners' keys, comparable across inputs in different orders.
    fn owners<'a>(keys: &'a [String], t: &[u32]) -> Vec<&'a str> {
        t.iter().map(|i| keys[*i as usize].as_str()).collect()
    }

    #[test]
    fn every_backend_owns_m_over_n_entries_give_or_take_one() {
        for n in [1, 2, 3, 7, 100, 163] {
            let k = keys(n);
            let t = build(&k, DEFAULT_SIZE);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let floor = DEFAULT_SIZE as usize / n;
            assert!(
                counts.iter().all(|c| *c == floor || *c == floor + 1),
                "{n} backends: counts {:?} not all {floor} or {}",
                &counts[..n.min(10)],
                floor + 1
            );
        }
    }

    #[test]
    fn the_order_of_the_backends_does_not_change_the_table() {
        let k = keys(20);
        let mut shuffled = k.clone();
        shuffled.reverse();
        shuffled.swap(3, 11);
        let a = build(&k, 251);
        let b = build(&shuffled, 251);
        assert_eq!(owners(&k, &a), owners(&shuffled, &b));
    }

    #[test]
    fn removing_one_backend_moves_its_entries_and_few_others() {
        let k = keys(100);
        let before = build(&k, DEFAULT_SIZE);
        let gone = 37;
        let mut rest = k.clone();
        rest.remove(gone);
        let after = build(&rest, DEFAULT_SIZE);
        let (was, now) = (owners(&k, &before), owners(&rest, &after));
        let mut moved_others = 0;
        for (w, n) in was.iter().zip(&now) {
            if *w == k[gone] {
                assert_ne!(*n, k[gone]);
            } else if w != n {
                moved_others += 1;
            }
        }
        // The paper's figure 10 and Cilium's rule: with M > 100 N, about 1%.
        let share = moved_others as f64 / f64::from(DEFAULT_SIZE);
        assert!(
            share < 0.03,
            "{moved_others} entries of other backends moved ({:.2}%)",
            share * 100.0
        );
    }

    #[test]
    fn sizes_that_are_not_prime_or_too_small_are_refused() {
        let k = keys(3);
        let k: Vec<&[u8]> = k.iter().map(|k| k.as_bytes()).collect();
        assert_eq!(table(&k, 16_384), Err(MaglevError::NotPrime(16_384)));
        assert_eq!(table(&k, 1), Err(MaglevError::NotPrime(1)));
        assert_eq!(
            table(&k, 2),
            Err(MaglevError::TooManyBackends {
                size: 2,
                backends: 3
            })
        );
        assert_eq!(table(&[], 251), Ok(Vec::new()));
    }

    #[test]
    fn equal_keys_share_the_table() {
        let k = vec!["same".to_string(), "same".to_string()];
        let t = build(&k, 251);
        let first = t.iter().filter(|i| **i == 0).count();
        assert!(first == 125 || first == 126, "{first}");
    }
}
