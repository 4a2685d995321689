//! A small deterministic mutator, for the mutation tests that run in every CI beside
//! the cargo-fuzz targets: valid inputs changed by bit flips, truncation, random bytes
//! and splices of two inputs, from a fixed seed so a failure reproduces.

pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    /// xorshift64: cheap and good enough to pick mutations.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// One mutation of one of `seeds` (which must not be empty).
    pub fn mutate(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut p = seeds[self.below(seeds.len())].clone();
        if p.is_empty() {
            return vec![self.next_u64() as u8];
        }
        match self.next_u64() % 4 {
            0 => {
                let i = self.below(p.len());
                p[i] ^= 1 << (self.next_u64() % 8);
            }
            1 => {
                let keep = self.below(p.len() + 1);
                p.truncate(keep);
            }
            2 => {
                for _ in 0..1 + self.below(3) {
                    let i = self.below(p.len());
                    p[i] = self.next_u64() as u8;
                }
            }
            _ => {
                let other = seeds[self.below(seeds.len())].clone();
                let cut = self.below(p.len());
                p.truncate(cut);
                let from = self.below(other.len().max(1));
                p.extend_from_slice(other.get(from..).unwrap_or(&[]));
            }
        }
        p
    }
}

/// Writes `seeds` to `$MESH_FUZZ_SEEDS/<target>/seed-N`, where `scripts/fuzz.sh`
/// starts the fuzzer of `target` from; does nothing without the variable. The seeds
/// are the ones the crate's mutation test starts from, so both begin alike.
pub fn write_seeds(target: &str, seeds: &[Vec<u8>]) -> std::io::Result<()> {
    let Some(dir) = std::env::var_os("MESH_FUZZ_SEEDS") else {
        return Ok(());
    };
    let dir = std::path::PathBuf::from(dir).join(target);
    std::fs::create_dir_all(&dir)?;
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        let seeds = vec![b"hello".to_vec(), b"world!".to_vec()];
        let a: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7);
            (0..100).map(|_| m.mutate(&seeds)).collect()
        };
        let b: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7);
            (0..100).map(|_| m.mutate(&seeds)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|p| !seeds.contains(p)));
    }
}
