//! Putting samples back into series: one per (customer, sandbox, epoch),
//! ordered by `seq`, with duplicates removed. The customer is part of the
//! identity, as in `usage_samples`: two customers' sandboxes that happen to
//! share an id are never one series.
//!
//! Samples may arrive in any order and more than once. An exact duplicate of a
//! (sandbox, epoch, seq) costs nothing; a different sample under the same
//! identity is a conflict, reported on its line and left out, because billing
//! either one would be a guess.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::LineError;
use crate::ids::{CustomerId, Epoch, SandboxId};
use crate::rating::NumberedSample;

/// Indices into the input, one vector per (customer, sandbox, epoch), in `seq` order,
/// without duplicates. Series come in order of first appearance, so the
/// result is deterministic.
pub(super) fn build_series(
    samples: &[NumberedSample],
    errors: &mut Vec<LineError>,
) -> Vec<Vec<usize>> {
    let (series_of, series_count) = number_series(samples);
    let mut series = bucket_by_series(&series_of, series_count);
    for members in &mut series {
        if !members.is_sorted_by_key(|index| samples[*index].sample.seq) {
            // Stable: among equal seqs the earliest input stays first.
            members.sort_by_key(|index| samples[*index].sample.seq);
        }
        drop_duplicates(samples, members, errors);
    }
    series
}

/// The series number of every sample, numbered by first appearance.
fn number_series(samples: &[NumberedSample]) -> (Vec<u32>, usize) {
    let mut number_of: HashMap<SeriesKey<'_>, u32, BuildHasherDefault<IdHasher>> =
        HashMap::default();
    let mut series_of = Vec::with_capacity(samples.len());
    let mut previous: Option<(SeriesKey<'_>, u32)> = None;
    for numbered in samples {
        let key = SeriesKey {
            customer: &numbered.sample.customer,
            sandbox: &numbered.sample.sandbox,
            epoch: numbered.sample.epoch,
        };
        // Traces are often grouped already: skip the hash for a run.
        let number = match previous {
            Some((previous_key, number)) if previous_key == key => number,
            _ => {
                let next = u32::try_from(number_of.len()).expect("fewer than 2^32 series");
                *number_of.entry(key).or_insert(next)
            }
        };
        series_of.push(number);
        previous = Some((key, number));
    }
    (series_of, number_of.len())
}

/// A series' identity. Equality takes the customer into account; the hash
/// leaves it out (equal keys still hash equal), because hashing a second id on
/// every sample cost a third of the rating throughput, and two customers
/// sharing a sandbox id, the only collision this adds, is rare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeriesKey<'a> {
    customer: &'a CustomerId,
    sandbox: &'a SandboxId,
    epoch: Epoch,
}

impl std::hash::Hash for SeriesKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sandbox.hash(state);
        self.epoch.hash(state);
    }
}

/// A counting sort of sample indices by series: two linear passes, no
/// per-sample allocation.
fn bucket_by_series(series_of: &[u32], series_count: usize) -> Vec<Vec<usize>> {
    let mut sizes = vec![0usize; series_count];
    for &number in series_of {
        sizes[number as usize] += 1;
    }
    let mut series: Vec<Vec<usize>> = sizes.into_iter().map(Vec::with_capacity).collect();
    for (index, &number) in series_of.iter().enumerate() {
        series[number as usize].push(index);
    }
    series
}

/// FNV-1a: ids are short, trusted-length strings from our own parser, and
/// the default SipHash costs more than the rest of grouping a sample.
#[derive(Debug, Clone, Copy)]
struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn drop_duplicates(
    samples: &[NumberedSample],
    members: &mut Vec<usize>,
    errors: &mut Vec<LineError>,
) {
    let mut kept: Vec<usize> = Vec::with_capacity(members.len());
    for &index in members.iter() {
        let candidate = &samples[index];
        let Some(&last) = kept.last() else {
            kept.push(index);
            continue;
        };
        let previous = &samples[last];
        if previous.sample.seq != candidate.sample.seq {
            kept.push(index);
        } else if previous.sample != candidate.sample {
            errors.push(LineError::new(
                candidate.line,
                "seq",
                format!(
                    "conflicts with line {}: same sandbox, epoch and seq {} but different values; the first is kept",
                    previous.line, candidate.sample.seq
                ),
            ));
        }
    }
    *members = kept;
}
