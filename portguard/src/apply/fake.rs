//! In-memory stand-in for the kernel maps, with the kernel's lookup
//! algorithm re-stated so tests can ask "what would the kernel decide":
//! through the per-cgroup policy cache of the cached programs, as they do
//! (a word per leaf cgroup, used while it carries the state's epoch and
//! generation), so every test that decides between applies also checks
//! that the applier makes stale words stale.

use std::{cell::RefCell, collections::HashMap};

use portguard_common::{
    AddrClass, CgroupKey, CgroupValue, Direction, EMPTY_SET, Family, MODE_AUDIT, PORTS_PER_CHUNK,
    PolicyRecord, PortChunk, PortChunkKey, Proto, State, cache_word, cache_word_governing,
    cache_word_is_current, set_slot,
};

use super::{RuleSink, SinkError};

#[derive(Default)]
pub struct FakeMaps {
    pub state: State,
    pub cgroups: HashMap<CgroupKey, CgroupValue>,
    pub policies: HashMap<u32, PolicyRecord>,
    pub chunks: HashMap<PortChunkKey, PortChunk>,
    /// Fail the n-th write from now (0 = the next one).
    pub fail_at: Option<usize>,
    pub writes: usize,
    pub max_cgroup_entries: Option<usize>,
    /// The cached programs' per-cgroup words, by the deciding task's own
    /// cgroup (the last id of its ancestry).
    pub cache: RefCell<HashMap<u64, u64>>,
    /// Decide as the object without the cache does (always walk).
    pub no_cache: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ungoverned,
    Allow,
    Deny,
    Audit,
}

impl FakeMaps {
    fn tick(&mut self, map: &'static str) -> Result<(), SinkError> {
        if let Some(n) = self.fail_at {
            if n == 0 {
                self.fail_at = None;
                return Err(SinkError::Full { map });
            }
            self.fail_at = Some(n - 1);
        }
        self.writes += 1;
        Ok(())
    }

    pub(super) fn contains(&self, set: u32, port: u16) -> bool {
        set != EMPTY_SET
            && self
                .chunks
                .get(&PortChunkKey {
                    set_id: set,
                    chunk: u32::from(port) / PORTS_PER_CHUNK,
                })
                .is_some_and(|c| c.contains(port))
    }

    /// The kernel's decision for a task whose cgroup ancestry (root first)
    /// is `ancestry`.
    #[expect(clippy::too_many_arguments, reason = "mirrors the kernel query")]
    pub fn decide(
        &self,
        ancestry: &[u64],
        dir: Direction,
        proto: Proto,
        family: Family,
        addr: AddrClass,
        port: u16,
        ephemeral_ok: bool,
    ) -> Verdict {
        let g = self.state.generation;
        if self.state.cgroups[g as usize] == 0 {
            return Verdict::Ungoverned;
        }
        let epoch = self.state.epoch;
        let leaf = ancestry.last().copied().unwrap_or(0);
        let cached = (epoch != 0 && !self.no_cache)
            .then(|| self.cache.borrow().get(&leaf).copied())
            .flatten()
            .filter(|w| cache_word_is_current(*w, epoch, g));
        let found = match cached {
            Some(word) => cache_word_governing(word),
            None => {
                let found = self.walk(ancestry);
                if epoch != 0 && !self.no_cache {
                    self.cache
                        .borrow_mut()
                        .insert(leaf, cache_word(epoch, g, found));
                }
                found
            }
        };
        let Some((_, index)) = found else {
            return Verdict::Ungoverned;
        };
        let rec = self.policies[&index];
        let restricted = match dir {
            Direction::Bind => rec.bind_restricted,
            Direction::Connect => rec.connect_restricted,
        };
        if restricted == 0 {
            return Verdict::Allow;
        }
        let slot = set_slot(dir, proto, family, addr);
        let set = rec.sets[slot];
        // As the kernel does: the record's inline ranges first.
        let has = |p: u16| {
            rec.inline_contains(slot, p)
                .unwrap_or_else(|| self.contains(set, p))
        };
        // Port 0 (bit 0 is `ephemeral`'s marker) is read only with
        // `ephemeral_ok`, as the kernel's `slot_allows` does.
        let named = port != 0 && has(port);
        if named || (ephemeral_ok && has(0)) {
            Verdict::Allow
        } else if rec.mode == MODE_AUDIT {
            Verdict::Audit
        } else {
            Verdict::Deny
        }
    }
}

impl FakeMaps {
    /// The kernel's ancestor walk: the deepest governed cgroup of
    /// `ancestry` in the live generation, as (level, record index).
    fn walk(&self, ancestry: &[u64]) -> Option<(u32, u32)> {
        let g = self.state.generation;
        let mut found = None;
        for (level, id) in ancestry.iter().enumerate() {
            if (level as u32) < self.state.min_level[g as usize] {
                continue;
            }
            if level as u32 > self.state.max_level[g as usize] {
                break;
            }
            if let Some(v) = self.cgroups.get(&CgroupKey {
                cgroup_id: *id,
                generation: g,
                _pad: 0,
            }) {
                found = Some((level as u32, v.policy_index));
            }
        }
        found
    }
}

impl RuleSink for FakeMaps {
    fn put_chunk(&mut self, key: PortChunkKey, chunk: &PortChunk) -> Result<(), SinkError> {
        self.tick("chunks")?;
        self.chunks.insert(key, *chunk);
        Ok(())
    }
    fn del_chunk(&mut self, key: PortChunkKey) -> Result<(), SinkError> {
        self.tick("chunks")?;
        self.chunks.remove(&key);
        Ok(())
    }
    fn put_policy(&mut self, index: u32, record: &PolicyRecord) -> Result<(), SinkError> {
        self.tick("policies")?;
        self.policies.insert(index, *record);
        Ok(())
    }
    fn put_cgroup(&mut self, key: CgroupKey, value: CgroupValue) -> Result<(), SinkError> {
        self.tick("cgroups")?;
        if self
            .max_cgroup_entries
            .is_some_and(|m| self.cgroups.len() >= m && !self.cgroups.contains_key(&key))
        {
            return Err(SinkError::Full { map: "cgroups" });
        }
        self.cgroups.insert(key, value);
        Ok(())
    }
    fn del_cgroup(&mut self, key: CgroupKey) -> Result<(), SinkError> {
        self.tick("cgroups")?;
        self.cgroups.remove(&key);
        Ok(())
    }
    fn put_state(&mut self, state: &State) -> Result<(), SinkError> {
        self.tick("state")?;
        self.state = *state;
        Ok(())
    }
}
