//! Compaction state per assigned partition, and the offsets it lets ingest
//! commit.
//!
//! Each partition has its own [`Compactor`]: a partition's messages arrive in
//! order, and a revoked partition's state is dropped whole, to be rebuilt by
//! its next owner from the offset committed for it. That offset is the
//! earliest one the compactor still needs (the first sample of an open
//! minute, or a sample whose fate waits on the next one), so a replay from it
//! rebuilds the same state and writes the same rows; what it re-reads before
//! that point in a series is kept again, which changes no bill.

use std::collections::HashMap;

use idlemeter_core::{CompactRule, CompactStats, Compacted, Compactor, UsageSample};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Debug)]
pub(crate) struct Partitions {
    topic: String,
    rule: CompactRule,
    compactors: HashMap<i32, Compactor<i64>>,
    /// Next offset to consume, per partition with state.
    next_offsets: HashMap<i32, i64>,
}

impl Partitions {
    pub fn new(topic: &str, rule: CompactRule) -> Self {
        Self {
            topic: topic.to_owned(),
            rule,
            compactors: HashMap::new(),
            next_offsets: HashMap::new(),
        }
    }

    /// Feeds one message's samples to its partition's compactor.
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        samples: Vec<UsageSample>,
        arrived_ms: i64,
        out: &mut Compacted,
    ) {
        let rule = self.rule;
        let compactor = self
            .compactors
            .entry(partition)
            .or_insert_with(|| Compactor::with_rule(rule));
        for sample in samples {
            compactor.push(sample, offset, arrived_ms, out);
        }
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// Notes a message that carried no usable sample (it was dead-lettered
    /// whole): its offset may be committed.
    pub fn skip(&mut self, partition: i32, offset: i64) {
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// Drops the state of partitions this process no longer owns.
    pub fn drop_revoked(&mut self, revoked: &[(String, i32)]) -> usize {
        let mut dropped = 0;
        for (topic, partition) in revoked {
            if *topic == self.topic {
                dropped += usize::from(self.compactors.remove(partition).is_some());
                self.next_offsets.remove(partition);
            }
        }
        dropped
    }

    /// Ends the series that received nothing since `before_ms`; returns,
    /// per partition where some ended, how many minute rows that wrote.
    pub fn end_quiet(&mut self, before_ms: i64, out: &mut Compacted) -> Vec<(i32, usize)> {
        let mut ended = Vec::new();
        for (partition, compactor) in &mut self.compactors {
            let before = out.minutes.len();
            compactor.end_quiet(before_ms, out);
            if out.minutes.len() > before {
                ended.push((*partition, out.minutes.len() - before));
            }
        }
        ended
    }

    /// For each partition with state: the earliest offset a replay must
    /// start from, or the next one to consume when nothing is held.
    pub fn offsets_to_commit(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, next) in &self.next_offsets {
            let held = self
                .compactors
                .get(partition)
                .and_then(Compactor::oldest_position);
            let offset = held.map_or(*next, |held| held.min(*next));
            list.add_partition_offset(&self.topic, *partition, Offset::Offset(offset))
                .expect("a fresh offset for a partition added once is accepted");
        }
        list
    }

    pub fn series_held(&self) -> usize {
        self.compactors.values().map(Compactor::series_count).sum()
    }

    pub fn take_stats(&mut self) -> CompactStats {
        let mut total = CompactStats::default();
        for compactor in self.compactors.values_mut() {
            total += compactor.take_stats();
        }
        total
    }
}
