//! A set of ports, kept as canonical (sorted, merged) inclusive ranges so
//! that thousands of policies cost kilobytes, not 8 KiB bitmaps each; the
//! kernel's bitmap chunks are produced only for distinct sets.
//! Port 0 stands for "ephemeral" (a bind to port 0 may keep the port the
//! kernel picks); see portguard-common.
//!
//! Owns [`PortSet`]. May import `std` and portguard-common's chunk layout;
//! nothing else of the policy layer.

use std::collections::BTreeMap;

use portguard_common::{PORTS_PER_CHUNK, PortChunk};

#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Sorted, non-overlapping, non-adjacent inclusive ranges.
    ranges: Vec<(u16, u16)>,
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

impl PortSet {
    /// The "ephemeral" pseudo-port.
    pub const EPHEMERAL: u16 = 0;

    /// Build from any ranges (`lo <= hi`), in any order, overlapping or not.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16)>) -> Self {
        let mut v: Vec<(u16, u16)> = ranges.into_iter().filter(|(a, b)| a <= b).collect();
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self { ranges: out }
    }

    pub fn insert(&mut self, port: u16) {
        self.insert_range(port, port);
    }

    /// Insert `lo..=hi`.
    pub fn insert_range(&mut self, lo: u16, hi: u16) {
        let mut all = std::mem::take(&mut self.ranges);
        all.push((lo, hi));
        *self = Self::from_ranges(all);
    }

    pub fn union_with(&mut self, other: &Self) {
        if other.ranges.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut self.ranges);
        all.extend_from_slice(&other.ranges);
        *self = Self::from_ranges(all);
    }

    pub fn contains(&self, port: u16) -> bool {
        let i = self.ranges.partition_point(|(_, hi)| *hi < port);
        self.ranges.get(i).is_some_and(|(lo, _)| *lo <= port)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The canonical ranges (port 0 = ephemeral).
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    /// Number of ports in the set (counting the ephemeral pseudo-port).
    pub fn len(&self) -> u32 {
        self.ranges
            .iter()
            .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
            .sum()
    }

    /// The ports of `self` not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            let mut start = u32::from(lo);
            let end = u32::from(hi);
            for &(olo, ohi) in &other.ranges {
                let (olo, ohi) = (u32::from(olo), u32::from(ohi));
                if ohi < start || olo > end {
                    continue;
                }
                if olo > start {
                    out.push((start as u16, (olo - 1) as u16));
                }
                start = ohi + 1;
                if start > end {
                    break;
                }
            }
            if start <= end {
                out.push((start as u16, end as u16));
            }
        }
        Self::from_ranges(out)
    }

    /// The ports in both.
    pub fn intersection(&self, other: &Self) -> Self {
        self.difference(&self.difference(other))
    }

    /// Non-empty 512-port chunks, as the kernel stores them, by chunk index.
    pub fn chunks(&self) -> Vec<(u32, PortChunk)> {
        let mut chunks: BTreeMap<u32, PortChunk> = BTreeMap::new();
        for &(lo, hi) in &self.ranges {
            let (lo, hi) = (u32::from(lo), u32::from(hi));
            // Fill word by word: a bit run within one 64-port word at a time.
            let mut p = lo;
            while p <= hi {
                let word_end = (p | 63).min(hi);
                let n = word_end - p + 1;
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << (p % 64)
                };
                let chunk = chunks.entry(p / PORTS_PER_CHUNK).or_default();
                chunk.bits[((p % PORTS_PER_CHUNK) / 64) as usize] |= mask;
                p = word_end + 1;
            }
        }
        chunks.into_iter().collect()
    }

    /// The set whose kernel chunks are `chunks` (the inverse of
    /// [`PortSet::chunks`]), e.g. read back from pinned maps.
    pub fn from_chunks(chunks: &[(u32, PortChunk)]) -> Self {
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for (c, chunk) in chunks {
            for bit in 0..PORTS_PER_CHUNK {
                let port = c * PORTS_PER_CHUNK + bit;
                let Ok(port) = u16::try_from(port) else {
                    break;
                };
                if chunk.contains(port) {
                    match ranges.last_mut() {
                        Some(last) if u32::from(last.1) + 1 == u32::from(port) => last.1 = port,
                        _ => ranges.push((port, port)),
                    }
                }
            }
        }
        Self::from_ranges(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_canonical() {
        let s = PortSet::from_ranges([(10, 20), (5, 9), (30, 30), (15, 25), (31, 40)]);
        assert_eq!(s.ranges(), &[(5, 25), (30, 40)]);
        assert_eq!(s, PortSet::from_ranges([(30, 40), (5, 25)]));
        assert_eq!(s.len(), 21 + 11);
        assert!(s.contains(5) && s.contains(25) && !s.contains(26) && s.contains(40));
        assert!(!s.contains(4) && !s.contains(41));
        let mut t = PortSet::default();
        t.insert(65535);
        t.insert_range(0, 0);
        assert_eq!(t.ranges(), &[(0, 0), (65535, 65535)]);
    }

    #[test]
    fn difference_and_intersection() {
        let a = PortSet::from_ranges([(0, 100), (200, 300), (65535, 65535)]);
        let b = PortSet::from_ranges([(0, 0), (50, 60), (250, 400), (65535, 65535)]);
        assert_eq!(a.difference(&b).ranges(), &[(1, 49), (61, 100), (200, 249)]);
        assert_eq!(
            a.intersection(&b).ranges(),
            &[(0, 0), (50, 60), (250, 300), (65535, 65535)]
        );
        assert_eq!(a.difference(&PortSet::default()), a);
        assert!(a.difference(&PortSet::from_ranges([(0, 65535)])).is_empty());
        for p in [
            0u16, 1, 49, 50, 61, 100, 199, 200, 249, 250, 300, 301, 65535,
        ] {
            assert_eq!(
                a.difference(&b).contains(p),
                a.contains(p) && !b.contains(p)
            );
        }
    }

    #[test]
    fn chunks_match_the_kernel_bit_layout() {
        let mut s = PortSet::default();
        s.insert(8080);
        s.insert_range(9000, 9099);
        s.insert_range(1000, 1200);
        s.insert(PortSet::EPHEMERAL);
        s.insert_range(65500, 65535);
        let chunks = s.chunks();
        let ids: Vec<u32> = chunks.iter().map(|(c, _)| *c).collect();
        assert_eq!(ids, vec![0, 1, 2, 15, 17, 127]);
        for (c, chunk) in &chunks {
            for bit in 0..PORTS_PER_CHUNK {
                let port = (c * PORTS_PER_CHUNK + bit) as u16;
                assert_eq!(chunk.contains(port), s.contains(port), "port {port}");
            }
        }
        assert!(PortSet::default().chunks().is_empty());
        let full = PortSet::from_ranges([(0, 65535)]);
        let chunks = full.chunks();
        assert_eq!(chunks.len(), 128);
        assert!(chunks.iter().all(|(_, c)| c.bits == [u64::MAX; 8]));
        assert_eq!(PortSet::from_chunks(&chunks), full);
        assert_eq!(PortSet::from_chunks(&s.chunks()), s);
        assert_eq!(PortSet::from_chunks(&[]), PortSet::default());
    }
}
