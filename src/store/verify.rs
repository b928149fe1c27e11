//! Verifying part of an extent without rehashing all of it.
//!
//! A BLAKE3 hash is the root of a binary tree over 1 KiB chunks. For an extent whose
//! length is a power of two of at least 8 KiB (every full block), the tree splits
//! evenly into 16 KiB leaves, and the leaves' chaining values ("outboard") determine
//! the root. When a whole extent is read and verified, its leaf chaining values are
//! kept in memory; a later read of a few KiB of it then hashes only the leaves it
//! touches and compares them with the kept values, which themselves were checked
//! against the extent's hash. Every byte returned is still verified; what is saved
//! is rehashing the rest of the block on each small read.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes per leaf. 16 KiB hashes at full SIMD width (16 chunks at once), so the
/// leaves of a 64 KiB block cost no more than its plain hash; 4 KiB leaves cost 4x.
pub const LEAF: usize = 16384;

/// Whether an extent of `len` bytes splits evenly into leaves.
pub fn eligible(len: usize) -> bool {
    len >= 2 * LEAF && len.is_power_of_two() && len <= 1 << 20
}

/// The chaining value of leaf `i` holding `data` (at most [`LEAF`] bytes).
pub fn leaf_cv(i: usize, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset((i * LEAF) as u64)
        .update(data)
        .finalize_non_root()
}

/// The chaining values of every leaf of `data` (an [`eligible`] length).
pub fn leaf_cvs(data: &[u8]) -> Vec<ChainingValue> {
    data.chunks(LEAF)
        .enumerate()
        .map(|(i, c)| leaf_cv(i, c))
        .collect()
}

/// The BLAKE3 hash of the data whose leaf chaining values are `cvs` (two or more, a
/// power of two).
pub fn root_of(cvs: &[ChainingValue]) -> [u8; 32] {
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks(2)
            .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
            .collect();
    }
    *merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn leaves_give_the_standard_hash() {
        for len in [32768, 65536, 1 << 20] {
            let d = data(len, 7);
            assert!(eligible(len));
            assert_eq!(
                root_of(&leaf_cvs(&d)),
                *blake3::hash(&d).as_bytes(),
                "len {len}"
            );
        }
        assert!(!eligible(16384) && !eligible(65535) && !eligible(2 << 20));
    }

    #[test]
    fn a_changed_byte_changes_its_leaf_only() {
        let d = data(65536, 1);
        let cvs = leaf_cvs(&d);
        let mut bad = d.clone();
        bad[2 * LEAF + 17] ^= 1;
        assert_ne!(leaf_cv(2, &bad[2 * LEAF..3 * LEAF]), cvs[2]);
        assert_eq!(leaf_cv(1, &bad[LEAF..2 * LEAF]), cvs[1]);
    }
}
