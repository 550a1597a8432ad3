//! A set of ports as a 65,536-bit bitmap. Bit 0 stands for "ephemeral" (a
//! bind to port 0 may keep the port the kernel picks); see portguard-common.

use portguard_common::{CHUNKS_PER_SET, PORTS_PER_CHUNK, PortChunk};

const WORDS: usize = 65536 / 64;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PortSet(Box<[u64; WORDS]>);

impl Default for PortSet {
    fn default() -> Self {
        Self(Box::new([0; WORDS]))
    }
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges()).finish()
    }
}

impl PortSet {
    /// The "ephemeral" pseudo-port.
    pub const EPHEMERAL: u16 = 0;

    pub fn insert(&mut self, port: u16) {
        self.0[port as usize / 64] |= 1 << (port % 64);
    }

    /// Insert `lo..=hi`.
    pub fn insert_range(&mut self, lo: u16, hi: u16) {
        for p in lo..=hi {
            self.insert(p);
        }
    }

    pub fn union_with(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= *b;
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.0[port as usize / 64] >> (port % 64)) & 1 == 1
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Maximal runs of set bits, as inclusive ranges (port 0 = ephemeral).
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let mut start: Option<u32> = None;
        for p in 0..=65536u32 {
            let set = p < 65536 && self.contains(p as u16);
            match (set, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    out.push((s as u16, (p - 1) as u16));
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    /// Non-empty 512-port chunks, as the kernel stores them.
    pub fn chunks(&self) -> Vec<(u32, PortChunk)> {
        let words_per_chunk = (PORTS_PER_CHUNK / 64) as usize;
        (0..CHUNKS_PER_SET)
            .filter_map(|c| {
                let start = c as usize * words_per_chunk;
                let words = &self.0[start..start + words_per_chunk];
                if words.iter().all(|w| *w == 0) {
                    return None;
                }
                let mut chunk = PortChunk::default();
                chunk.bits.copy_from_slice(words);
                Some((c, chunk))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_match_the_kernel_bit_layout() {
        let mut s = PortSet::default();
        s.insert(8080);
        s.insert_range(9000, 9099);
        s.insert(PortSet::EPHEMERAL);
        let chunks = s.chunks();
        // 0 and 8080/9000.. live in chunks 0, 15 and 17.
        let ids: Vec<u32> = chunks.iter().map(|(c, _)| *c).collect();
        assert_eq!(ids, vec![0, 15, 17]);
        for (c, chunk) in &chunks {
            for bit in 0..PORTS_PER_CHUNK {
                let port = (c * PORTS_PER_CHUNK + bit) as u16;
                assert_eq!(chunk.contains(port), s.contains(port), "port {port}");
            }
        }
        assert!(!s.contains(8999) && s.contains(9000) && s.contains(9099) && !s.contains(9100));
    }

    #[test]
    fn ranges_roundtrip() {
        let mut s = PortSet::default();
        s.insert_range(1, 3);
        s.insert(65535);
        assert_eq!(s.ranges(), vec![(1, 3), (65535, 65535)]);
        assert!(PortSet::default().chunks().is_empty());
    }
}
