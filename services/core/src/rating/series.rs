//! Putting samples back into series: one per (sandbox, epoch), ordered by
//! `seq`, with duplicates removed.
//!
//! Samples may arrive in any order and more than once. An exact duplicate of a
//! (sandbox, epoch, seq) costs nothing; a different sample under the same
//! identity is a conflict, reported on its line and left out, because billing
//! either one would be a guess.

use std::collections::HashMap;

use crate::error::LineError;
use crate::ids::{Epoch, SandboxId};
use crate::rating::NumberedSample;

/// Indices into the input, one vector per (sandbox, epoch), in `seq` order,
/// without duplicates. Series come in order of first appearance, so the
/// result is deterministic.
pub(super) fn build_series(
    samples: &[NumberedSample],
    errors: &mut Vec<LineError>,
) -> Vec<Vec<usize>> {
    let mut series = group_by_sandbox_epoch(samples);
    for members in &mut series {
        if !members.is_sorted_by_key(|index| samples[*index].sample.seq) {
            // Stable: among equal seqs the earliest input stays first.
            members.sort_by_key(|index| samples[*index].sample.seq);
        }
        drop_duplicates(samples, members, errors);
    }
    series
}

fn group_by_sandbox_epoch(samples: &[NumberedSample]) -> Vec<Vec<usize>> {
    let mut index_of: HashMap<(&SandboxId, Epoch), usize> = HashMap::new();
    let mut series: Vec<Vec<usize>> = Vec::new();
    let mut previous: Option<((&SandboxId, Epoch), usize)> = None;
    for (index, numbered) in samples.iter().enumerate() {
        let key = (&numbered.sample.sandbox, numbered.sample.epoch);
        // Traces are usually grouped already: skip the hash for a run.
        let position = match previous {
            Some((previous_key, position)) if previous_key == key => position,
            _ => *index_of.entry(key).or_insert_with(|| {
                series.push(Vec::new());
                series.len() - 1
            }),
        };
        series[position].push(index);
        previous = Some((key, position));
    }
    series
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
