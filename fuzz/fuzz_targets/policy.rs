//! Fuzz the policy pipeline a hostile or broken policy file goes through:
//! the YAML parser and validator, the compiler, the map writer (against a
//! sink that checks every write), and incremental re-parsing.
//!
//! Input: two policy texts separated by the first NUL byte (the second is an
//! "edit" of the first). Properties checked, besides "no panic, no hang":
//! - a text that parses compiles, and its policies apply to maps with room
//!   for them without error, writing only keys and records in range;
//! - re-parsing after the edit gives exactly what a full parse gives.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use portguard::{
    policy::{apply_reserved, compile_all, parse_policy_text, reparse_policy_text},
    apply::{Applier, Capacity, ResolvedCgroup, RuleSink, SinkError, Target},
};
use portguard_common::{
    CgroupKey, CgroupValue, EMPTY_SET, PolicyRecord, PortChunk, PortChunkKey, State,
};

/// Map writes, checked against the capacities.
struct CheckedSink {
    caps: Capacity,
    chunks: HashMap<PortChunkKey, PortChunk>,
    policies: HashMap<u32, PolicyRecord>,
    cgroups: HashMap<CgroupKey, CgroupValue>,
}

impl RuleSink for CheckedSink {
    fn put_chunk(&mut self, key: PortChunkKey, chunk: &PortChunk) -> Result<(), SinkError> {
        assert!(key.set_id != EMPTY_SET, "a chunk of the empty set");
        assert!(key.chunk < 128, "chunk index {} out of range", key.chunk);
        self.chunks.insert(key, *chunk);
        assert!(
            self.chunks.len() as u32 <= self.caps.chunks,
            "chunks over capacity"
        );
        Ok(())
    }
    fn del_chunk(&mut self, key: PortChunkKey) -> Result<(), SinkError> {
        self.chunks.remove(&key);
        Ok(())
    }
    fn put_policy(&mut self, index: u32, record: &PolicyRecord) -> Result<(), SinkError> {
        assert!(
            index < self.caps.policy_map_entries(),
            "record {index} out of range"
        );
        for &set in &record.sets {
            assert!(
                set == EMPTY_SET || self.chunks.keys().any(|k| k.set_id == set),
                "record {index} points at set {set}, which has no chunk yet"
            );
        }
        self.policies.insert(index, *record);
        Ok(())
    }
    fn put_cgroup(&mut self, key: CgroupKey, value: CgroupValue) -> Result<(), SinkError> {
        assert!(value.policy_index < self.caps.policy_map_entries());
        self.cgroups.insert(key, value);
        assert!(self.cgroups.len() as u32 <= self.caps.cgroup_map_entries());
        Ok(())
    }
    fn del_cgroup(&mut self, key: CgroupKey) -> Result<(), SinkError> {
        self.cgroups.remove(&key);
        Ok(())
    }
    fn put_state(&mut self, state: &State) -> Result<(), SinkError> {
        assert!(state.generation < 2);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    let (Ok(a), Ok(b)) = (std::str::from_utf8(a), std::str::from_utf8(b)) else {
        return;
    };
    let Ok(parsed) = parse_policy_text(a.to_owned()) else {
        return;
    };
    let policies = &parsed.file.policies;
    let mut compiled = compile_all(policies);
    apply_reserved(&mut compiled, &parsed.file.reserved);
    assert_eq!(compiled.len(), policies.len());
    let caps = Capacity {
        cgroups: 64,
        policies: policies.len().max(1) as u32,
        chunks: (policies.len() as u32 + 1) * 2 * 128 * 8,
    };
    let mut sink = CheckedSink {
        caps,
        chunks: HashMap::new(),
        policies: HashMap::new(),
        cgroups: HashMap::new(),
    };
    let targets: Vec<Target<'_>> = compiled
        .iter()
        .enumerate()
        .map(|(i, p)| Target {
            policy_id: i as u32 + 1,
            policy: p,
            cgroups: if i < 32 {
                vec![ResolvedCgroup {
                    id: 1000 + i as u64,
                    level: 1 + (i as u32 % 4),
                }]
                .into()
            } else {
                Vec::new().into()
            },
        })
        .collect();
    let mut applier = Applier::new(caps);
    applier.unattached();
    applier
        .apply(&mut sink, &targets)
        .expect("a valid policy fits maps sized for it");
    applier.unattached();
    applier
        .apply(&mut sink, &targets)
        .expect("applying the same policy again");

    // Incremental re-parse agrees with a full parse.
    let full = parse_policy_text(b.to_owned());
    match (reparse_policy_text(&parsed, b.to_owned()), full) {
        (Ok((re, _)), Ok(full)) => assert_eq!(re.file, full.file, "re-parse differs"),
        (Err(_), Err(_)) => {}
        (re, full) => panic!(
            "re-parse and full parse disagree: {:?} vs {:?}",
            re.map(|_| ()),
            full.map(|_| ())
        ),
    }
});
