//! The seam between the planner and the kernel: [`RuleSink`], the map writes
//! an apply makes. `kernel::KernelMaps` implements it over the real maps;
//! [`super::fake::FakeMaps`] in memory, for the unit tests.

use portguard_common::{CgroupKey, CgroupValue, PolicyRecord, PortChunk, PortChunkKey, State};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("updating map {map}: {source}")]
    Map {
        map: &'static str,
        /// The kernel's error (an aya `MapError`), boxed so this layer
        /// stays free of aya.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The kernel map writes an apply needs.
pub trait RuleSink {
    fn put_chunk(&mut self, key: PortChunkKey, chunk: &PortChunk) -> Result<(), SinkError>;
    fn del_chunk(&mut self, key: PortChunkKey) -> Result<(), SinkError>;
    fn put_policy(&mut self, index: u32, record: &PolicyRecord) -> Result<(), SinkError>;
    fn put_cgroup(&mut self, key: CgroupKey, value: CgroupValue) -> Result<(), SinkError>;
    fn del_cgroup(&mut self, key: CgroupKey) -> Result<(), SinkError>;
    fn put_state(&mut self, state: &State) -> Result<(), SinkError>;
    /// Return once every program that was running when called has finished
    /// (false: cannot tell; the applier then relies on [`GRACE`] alone).
    fn wait_for_readers(&mut self) -> bool {
        false
    }
    /// The same wait as [`RuleSink::wait_for_readers`], as a function that
    /// may run on another thread: the applier starts it right after a flip
    /// and collects it before it next rewrites the retired generation, so
    /// the wait overlaps whatever happens in between. `None`: not offered
    /// (the applier then waits in [`RuleSink::wait_for_readers`]).
    fn reader_barrier(&self) -> Option<fn() -> bool> {
        None
    }
}
