//! The usage API's minute, hour and day windows from the compacted tables
//! give the quantities the per-second rows gave: the same data is stored
//! compacted (as ingest writes it) and with every sample kept, and both must
//! answer what the rollup arithmetic gives on the per-second samples
//! themselves (the per-second path: smallest and largest counters per
//! window, everything before the range as the baseline).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::rollup::{usage_by_hour, Counters, HourCounters, HourUsage};
use idlemeter_core::{compact_all, CompactRule, UsageSample};
use idlemeter_store::{SandboxRange, Window};
use idlemeter_tests::{counted_trace, TestEnv};

fn at(hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 4, hour, minute, 0)
        .single()
        .expect("valid time")
}

fn counters(sample: &UsageSample) -> Counters {
    Counters {
        cpu_used_usec: sample.cpu_used_usec,
        net_rx_bytes: sample.net_rx_bytes,
        net_tx_bytes: sample.net_tx_bytes,
        vcpu_alloc_usec: sample.vcpu_alloc_usec,
        mem_alloc_kib_ms: sample.mem_alloc_kib_ms,
        mem_used_kib_ms: sample.mem_used_kib_ms,
        gpu_alloc_ms: sample.gpu_alloc_ms,
        disk_mib_ms: sample.disk_mib_ms,
    }
}

fn lower(a: Counters, b: Counters) -> Counters {
    Counters {
        cpu_used_usec: a.cpu_used_usec.min(b.cpu_used_usec),
        net_rx_bytes: a.net_rx_bytes.min(b.net_rx_bytes),
        net_tx_bytes: a.net_tx_bytes.min(b.net_tx_bytes),
        vcpu_alloc_usec: a.vcpu_alloc_usec.min(b.vcpu_alloc_usec),
        mem_alloc_kib_ms: a.mem_alloc_kib_ms.min(b.mem_alloc_kib_ms),
        mem_used_kib_ms: a.mem_used_kib_ms.min(b.mem_used_kib_ms),
        gpu_alloc_ms: a.gpu_alloc_ms.min(b.gpu_alloc_ms),
        disk_mib_ms: a.disk_mib_ms.min(b.disk_mib_ms),
    }
}

fn upper(a: Counters, b: Counters) -> Counters {
    Counters {
        cpu_used_usec: a.cpu_used_usec.max(b.cpu_used_usec),
        net_rx_bytes: a.net_rx_bytes.max(b.net_rx_bytes),
        net_tx_bytes: a.net_tx_bytes.max(b.net_tx_bytes),
        vcpu_alloc_usec: a.vcpu_alloc_usec.max(b.vcpu_alloc_usec),
        mem_alloc_kib_ms: a.mem_alloc_kib_ms.max(b.mem_alloc_kib_ms),
        mem_used_kib_ms: a.mem_used_kib_ms.max(b.mem_used_kib_ms),
        gpu_alloc_ms: a.gpu_alloc_ms.max(b.gpu_alloc_ms),
        disk_mib_ms: a.disk_mib_ms.max(b.disk_mib_ms),
    }
}

/// Windows of `[from, to)` of `width` seconds straight from per-second
/// samples: per (sandbox, epoch, window) the smallest and largest counters
/// and the seq span, every earlier sample folded into the baseline, only
/// epochs with a sample in the range.
fn reference(samples: &[UsageSample], from: i64, to: i64, width: i64) -> Vec<HourUsage> {
    type Key = (String, u64, bool, i64);
    let mut rows: BTreeMap<Key, (u64, u64, Counters, Counters)> = BTreeMap::new();
    let in_range: std::collections::BTreeSet<(String, u64)> = samples
        .iter()
        .filter(|s| (from..to).contains(&s.ts.timestamp()))
        .map(|s| (s.sandbox.to_string(), s.epoch.0))
        .collect();
    for sample in samples {
        let second = sample.ts.timestamp();
        if second >= to || !in_range.contains(&(sample.sandbox.to_string(), sample.epoch.0)) {
            continue;
        }
        let baseline = second < from;
        let bucket = if baseline {
            0
        } else {
            second - second.rem_euclid(width)
        };
        let value = counters(sample);
        let entry = rows
            .entry((sample.sandbox.to_string(), sample.epoch.0, baseline, bucket))
            .or_insert((sample.seq, sample.seq, value, value));
        entry.0 = entry.0.min(sample.seq);
        entry.1 = entry.1.max(sample.seq);
        entry.2 = lower(entry.2, value);
        entry.3 = upper(entry.3, value);
    }
    let rows: Vec<HourCounters> = rows
        .into_iter()
        .map(
            |((sandbox, epoch, baseline, bucket), (first, last, min, max))| HourCounters {
                sandbox: idlemeter_core::SandboxId::parse(sandbox).expect("valid"),
                epoch: idlemeter_core::Epoch(epoch),
                hour: DateTime::from_timestamp(bucket, 0).expect("time"),
                is_baseline: baseline,
                samples: if baseline { 0 } else { last - first + 1 },
                min,
                max,
            },
        )
        .collect();
    usage_by_hour(&rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minute_hour_and_day_windows_match_the_per_second_rows() -> anyhow::Result<()> {
    // Two sandboxes, one across three hours, one starting mid-hour: resizes,
    // suspensions and sessions come and go (see counted_trace).
    let mut samples = counted_trace("acme", "sbx-a", at(9, 40), 1, 3 * 3600);
    samples.extend(counted_trace("acme", "sbx-b", at(10, 15), 1, 5_000));
    let compacted_env = TestEnv::new("windows_compacted").await?;
    compacted_env.store_as_ingest(&samples).await?;
    let every_env = TestEnv::new("windows_every_sample").await?;
    every_env
        .store
        .insert_compacted(&compact_all(samples.iter().cloned(), CompactRule::KEEP_ALL))
        .await?;
    let kept: u64 = compacted_env
        .store
        .client()
        .query("SELECT count() FROM usage_samples FINAL")
        .fetch_one()
        .await?;
    // The trace opens and closes a session every 5 s, and each change is
    // kept with its neighbours: a quarter is dropped here, most of a
    // steadier fleet's.
    assert!(
        kept * 10 < samples.len() as u64 * 8,
        "{kept} of {} samples kept: compaction must have dropped some",
        samples.len()
    );
    let range = SandboxRange {
        first: "a".to_owned(),
        last: "z".to_owned(),
    };
    let unix = |time: DateTime<Utc>| u32::try_from(time.timestamp()).expect("after 1970");
    let day = at(0, 0);
    for (window, from, to, width) in [
        (Window::Minute, at(10, 31), at(11, 31), 60),
        (Window::Minute, at(12, 0), at(12, 45), 60),
        (Window::Hour, at(9, 0), at(13, 0), 3_600),
        (Window::Hour, at(11, 0), at(12, 0), 3_600),
        (Window::Day, day, day + chrono::Duration::days(1), 86_400),
    ] {
        let expected = reference(&samples, from.timestamp(), to.timestamp(), width);
        assert!(!expected.is_empty());
        for (env, how) in [(&compacted_env, "compacted"), (&every_env, "every sample")] {
            let got = env
                .store
                .usage_by_window("acme", &range, unix(from), unix(to), window)
                .await?;
            assert_eq!(got, expected, "{window:?} {from} - {to}, stored {how}");
        }
    }
    Ok(())
}
