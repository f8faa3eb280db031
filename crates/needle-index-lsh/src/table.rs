//! One hash table: key ids grouped by signature.
//!
//! Layout choice: the bulk is CSR over the distinct signatures, sorted (`sigs`, `starts`,
//! `ids`), built by one sort at build time. A bucket is a contiguous run of `u32` ids, so
//! gathering candidates is a linear read, and the cost is 4 bytes per key plus 8 per
//! distinct signature (at most `2^K`), with no per-bucket allocation. A `HashMap<u32,
//! Vec<u32>>` would cost a heap allocation, ~32 bytes of map entry and up to 2× capacity
//! slack per bucket; with `K = 16` and few keys per bucket that is several times the ids.
//! Lookup is a binary search over at most `min(n, 2^K)` signatures, negligible next to
//! reading the bucket. Keys inserted after the build go to a small hash-map `tail` (O(1)
//! insert and lookup) that is merged into the CSR once it holds more than an eighth of the
//! keys, so an insert costs amortised O(log n) per table.

use std::collections::HashMap;

use needle_core::Result;

use crate::state::{Reader, Writer};

/// Smallest tail that triggers a merge: below it the merge would cost more than it saves.
const MIN_TAIL: usize = 1024;

/// Ids of the keys in one table's buckets.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    sigs: Vec<u32>,
    starts: Vec<u32>,
    ids: Vec<u32>,
    tail: HashMap<u32, Vec<u32>>,
    tail_len: usize,
}

/// What one bucket lookup returned and cost.
pub(crate) struct Bucket<'a> {
    /// Ids from the CSR part, ascending.
    pub(crate) bulk: &'a [u32],
    /// Ids inserted since the last merge, ascending.
    pub(crate) tail: &'a [u32],
    /// Signatures compared (binary-search probes plus a tail lookup).
    pub(crate) probes: u64,
}

impl Table {
    /// A table from `(signature, id)` pairs packed as `sig << 32 | id`.
    pub(crate) fn from_pairs(mut pairs: Vec<u64>) -> Self {
        pairs.sort_unstable();
        let mut t = Table { ids: Vec::with_capacity(pairs.len()), ..Table::default() };
        for &p in &pairs {
            let sig = (p >> 32) as u32;
            if t.sigs.last() != Some(&sig) {
                t.sigs.push(sig);
                t.starts.push(t.ids.len() as u32);
            }
            t.ids.push(p as u32);
        }
        t.starts.push(t.ids.len() as u32);
        t
    }

    /// The keys whose signature is `sig`.
    pub(crate) fn bucket(&self, sig: u32) -> Bucket<'_> {
        // Probes of a binary search over `sigs.len()` entries.
        let mut probes = u64::from(usize::BITS - self.sigs.len().leading_zeros());
        let i = self.sigs.partition_point(|&s| s < sig);
        let bulk = match self.sigs.get(i) {
            Some(&s) if s == sig => &self.ids[self.starts[i] as usize..self.starts[i + 1] as usize],
            _ => &[],
        };
        let tail = if self.tail.is_empty() {
            &[][..]
        } else {
            probes += 1;
            self.tail.get(&sig).map_or(&[][..], Vec::as_slice)
        };
        Bucket { bulk, tail, probes }
    }

    /// Adds key `id` (larger than every id held) under `sig`; merges the tail when it grew
    /// past an eighth of the bulk.
    pub(crate) fn push(&mut self, sig: u32, id: u32) {
        self.tail.entry(sig).or_default().push(id);
        self.tail_len += 1;
        if self.tail_len > MIN_TAIL.max(self.ids.len() / 8) {
            self.merge_tail();
        }
    }

    /// Rebuilds the CSR with the tail in it.
    fn merge_tail(&mut self) {
        let mut pairs = Vec::with_capacity(self.ids.len() + self.tail_len);
        for (i, &sig) in self.sigs.iter().enumerate() {
            let run = &self.ids[self.starts[i] as usize..self.starts[i + 1] as usize];
            pairs.extend(run.iter().map(|&id| u64::from(sig) << 32 | u64::from(id)));
        }
        for (&sig, ids) in &self.tail {
            pairs.extend(ids.iter().map(|&id| u64::from(sig) << 32 | u64::from(id)));
        }
        *self = Table::from_pairs(pairs);
    }

    /// Keys held.
    /// Writes the bulk arrays, then the tail as ascending signatures, run lengths and ids.
    pub(crate) fn save(&self, w: &mut Writer<'_>) {
        w.u32s(&self.sigs);
        w.u32s(&self.starts);
        w.u32s(&self.ids);
        let mut tail: Vec<(&u32, &Vec<u32>)> = self.tail.iter().collect();
        tail.sort_unstable_by_key(|t| *t.0);
        w.u32s(&tail.iter().map(|t| *t.0).collect::<Vec<_>>());
        w.u32s(&tail.iter().map(|t| t.1.len() as u32).collect::<Vec<_>>());
        w.u32s(&tail.iter().flat_map(|t| t.1.iter().copied()).collect::<Vec<_>>());
    }

    /// Reads a table over `n` keys with `k_bits`-bit signatures: every key once, signatures
    /// ascending and in range, bucket offsets consistent.
    pub(crate) fn load(r: &mut Reader<'_>, field: &str, n: usize, k_bits: usize) -> Result<Self> {
        let sig_bound = 1u64 << k_bits;
        let sorted_sigs = |r: &Reader<'_>, sigs: &[u32]| -> Result<()> {
            if let Some(i) = sigs.windows(2).position(|w| w[0] >= w[1]) {
                return Err(r.fail(field, format!("signatures not ascending at {}", i + 1)));
            }
            match sigs.last() {
                Some(&s) if u64::from(s) >= sig_bound => {
                    Err(r.fail(field, format!("signature {s} has more than {k_bits} bits")))
                }
                _ => Ok(()),
            }
        };
        let sigs = r.u32s(field, n)?;
        sorted_sigs(r, &sigs)?;
        let starts = r.u32s_exact(field, sigs.len() + 1)?;
        let ids = r.u32s(field, n)?;
        if starts[0] != 0 || starts.windows(2).any(|w| w[0] > w[1]) || starts[sigs.len()] as usize != ids.len() {
            return Err(r.fail(field, "bucket offsets are not ascending from 0 to the id count"));
        }
        r.check_below(field, &ids, n)?;
        let tail_sigs = r.u32s(field, n - ids.len())?;
        sorted_sigs(r, &tail_sigs)?;
        let lens = r.u32s_exact(field, tail_sigs.len())?;
        let tail_len = lens.iter().map(|&l| l as usize).sum::<usize>();
        if lens.contains(&0) || tail_len + ids.len() != n {
            return Err(r.fail(field, format!("{} bulk and {tail_len} tail entries for {n} keys", ids.len())));
        }
        let tail_ids = r.u32s_exact(field, tail_len)?;
        r.check_below(field, &tail_ids, n)?;
        let mut tail = HashMap::with_capacity(tail_sigs.len());
        let mut at = 0;
        for (&sig, &l) in tail_sigs.iter().zip(&lens) {
            tail.insert(sig, tail_ids[at..at + l as usize].to_vec());
            at += l as usize;
        }
        Ok(Self { sigs, starts, ids, tail, tail_len })
    }

    #[cfg(test)]
    pub(crate) fn is_tail_empty(&self) -> bool {
        self.tail.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len() + self.tail_len
    }

    /// Bytes held (map overhead estimated at 32 bytes per tail bucket).
    pub(crate) fn memory_bytes(&self) -> usize {
        4 * (self.sigs.capacity() + self.starts.capacity() + self.ids.capacity())
            + self.tail.values().map(|v| 32 + 4 * v.capacity()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(sig: u32, id: u32) -> u64 {
        u64::from(sig) << 32 | u64::from(id)
    }

    #[test]
    fn buckets_group_ids_by_signature() {
        let t = Table::from_pairs(vec![pack(5, 0), pack(2, 1), pack(5, 2), pack(9, 3)]);
        assert_eq!(t.bucket(5).bulk, &[0, 2]);
        assert_eq!(t.bucket(2).bulk, &[1]);
        assert!(t.bucket(3).bulk.is_empty() && t.bucket(3).tail.is_empty());
        assert!(t.bucket(10).bulk.is_empty());
        assert_eq!(t.len(), 4);
        assert!(Table::from_pairs(Vec::new()).bucket(0).bulk.is_empty());
    }

    #[test]
    fn pushes_are_found_before_and_after_the_merge() {
        let mut t = Table::from_pairs(vec![pack(1, 0)]);
        t.push(1, 1);
        t.push(7, 2);
        let b = t.bucket(1);
        assert_eq!((b.bulk, b.tail), (&[0][..], &[1][..]));
        assert_eq!(t.bucket(7).tail, &[2]);
        for id in 3..(MIN_TAIL as u32 + 10) {
            t.push(id % 3, id);
        }
        assert!(t.tail_len < MIN_TAIL, "the tail was merged");
        assert_eq!(t.len(), MIN_TAIL + 10);
        let b = t.bucket(1);
        let all: Vec<u32> = b.bulk.iter().chain(b.tail).copied().collect();
        assert!(all.starts_with(&[0, 1, 4]));
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
