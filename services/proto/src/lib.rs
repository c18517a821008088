//! The wire contract (`proto/idlemeter/v1/usage.proto`) and its edge.
//!
//! prost-generated types live in [`v1`] and never travel further than this crate's
//! callers' adapters: [`decode_node_batch`] turns bytes into validated core
//! [`UsageSample`]s (keeping the good samples of a batch that also holds bad ones),
//! and [`encode_node_batch`] goes the other way for collectors and simulators.

use chrono::{DateTime, Utc};
use idlemeter_core::{
    CounterSet, CustomerId, Epoch, LifecycleState, NodeId, SampleDetail, SandboxId, StateCounters,
    UsageSample, VcpuMillis,
};
use prost::Message;

/// prost-generated types of `idlemeter.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/idlemeter.v1.rs"));
}

/// The schema version this build produces and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a message cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a protobuf NodeBatch: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("schema_version {found} is not supported (this build knows {SCHEMA_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("node id of the batch: {0}")]
    BadNode(idlemeter_core::IdError),
    #[error("sample {index}: {reason}")]
    BadSample { index: usize, reason: String },
    #[error("command: {0}")]
    BadCommand(String),
}

/// A decoded node batch: the samples that passed validation and why the others did not.
#[derive(Debug)]
pub struct DecodedBatch {
    pub node: NodeId,
    pub batch_seq: u64,
    pub samples: Vec<UsageSample>,
    /// One entry per refused sample, [`WireError::BadSample`].
    pub rejected: Vec<WireError>,
}

/// Decodes a Kafka message of `usage.samples`. A whole-message problem is an
/// `Err`; bad individual samples land in [`DecodedBatch::rejected`] and the good
/// ones are kept.
pub fn decode_node_batch(bytes: &[u8]) -> Result<DecodedBatch, WireError> {
    let batch = v1::NodeBatch::decode(bytes)?;
    if batch.schema_version != SCHEMA_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: batch.schema_version,
        });
    }
    let node = NodeId::parse(batch.node).map_err(WireError::BadNode)?;
    let mut samples = Vec::with_capacity(batch.samples.len());
    let mut rejected = Vec::new();
    for (index, wire) in batch.samples.into_iter().enumerate() {
        match sample_from_wire(wire, &node) {
            Ok(sample) => samples.push(sample),
            Err(reason) => rejected.push(WireError::BadSample { index, reason }),
        }
    }
    Ok(DecodedBatch {
        node,
        batch_seq: batch.batch_seq,
        samples,
        rejected,
    })
}

fn sample_from_wire(wire: v1::UsageSample, batch_node: &NodeId) -> Result<UsageSample, String> {
    let node = NodeId::parse(wire.node).map_err(|e| e.to_string())?;
    if &node != batch_node {
        return Err(format!(
            "node {node} differs from the batch's node {batch_node}"
        ));
    }
    let state = match v1::LifecycleState::try_from(wire.state) {
        Ok(v1::LifecycleState::Running) => LifecycleState::Running,
        Ok(v1::LifecycleState::Suspended) => LifecycleState::Suspended,
        Ok(v1::LifecycleState::Stopped) => LifecycleState::Stopped,
        Ok(v1::LifecycleState::Unspecified) | Err(_) => {
            return Err(format!(
                "field `state`: {} is not a lifecycle state",
                wire.state
            ))
        }
    };
    let ts = DateTime::<Utc>::from_timestamp_millis(wire.ts_unix_ms)
        .filter(|ts| ts.timestamp() > 0)
        .ok_or_else(|| {
            format!(
                "field `ts_unix_ms`: {} is not a valid time",
                wire.ts_unix_ms
            )
        })?;
    let sample = UsageSample {
        customer: CustomerId::parse(wire.customer).map_err(|e| e.to_string())?,
        node,
        sandbox: SandboxId::parse(wire.sandbox).map_err(|e| e.to_string())?,
        epoch: Epoch(wire.epoch),
        seq: wire.seq,
        ts,
        state,
        vcpu: VcpuMillis(wire.vcpu_milli),
        mem_bytes: wire.mem_bytes,
        gpu_model: Some(wire.gpu_model).filter(|model| !model.is_empty()),
        gpu_count: wire.gpu_count,
        disk_bytes: wire.disk_bytes,
        cpu_used_usec: wire.cpu_used_usec,
        net_rx_bytes: wire.net_rx_bytes,
        net_tx_bytes: wire.net_tx_bytes,
        vcpu_alloc_usec: wire.vcpu_alloc_usec,
        mem_alloc_kib_ms: wire.mem_alloc_kib_ms,
        mem_used_kib_ms: wire.mem_used_kib_ms,
        gpu_alloc_ms: wire.gpu_alloc_ms,
        disk_mib_ms: wire.disk_mib_ms,
        api_calls: wire.api_calls,
        mem_used_bytes: wire.mem_used_bytes,
        exec_sessions: wire.exec_sessions,
        open_conns: wire.open_conns,
        detail: SampleDetail {
            gpu_busy_ms: wire.gpu_busy_ms,
            gpu_mem_used_bytes: wire.gpu_mem_used_bytes,
            cpu_pressure_usec: wire.cpu_pressure_usec,
            mem_pressure_usec: wire.mem_pressure_usec,
            io_pressure_usec: wire.io_pressure_usec,
            mem_peak_bytes: wire.mem_peak_bytes,
            io_read_bytes: wire.io_read_bytes,
            io_write_bytes: wire.io_write_bytes,
        },
        state_counters: StateCounters {
            running_ms: wire.running_ms,
            suspended_ms: wire.suspended_ms,
            active_ms: wire.active_ms,
            vcpu_alloc_active_usec: wire.vcpu_alloc_active_usec,
            vcpu_max_usec: wire.vcpu_max_usec,
            vcpu_max_active_usec: wire.vcpu_max_active_usec,
            cpu_used_active_usec: wire.cpu_used_active_usec,
            mem_alloc_active_kib_ms: wire.mem_alloc_active_kib_ms,
            mem_max_kib_ms: wire.mem_max_kib_ms,
            mem_max_active_kib_ms: wire.mem_max_active_kib_ms,
            mem_used_active_kib_ms: wire.mem_used_active_kib_ms,
            gpu_alloc_active_ms: wire.gpu_alloc_active_ms,
            disk_running_mib_ms: wire.disk_running_mib_ms,
            disk_active_mib_ms: wire.disk_active_mib_ms,
        },
        // Bits of counters this version does not know are dropped: they
        // cannot be read, so they must not be claimed.
        counters_present: CounterSet(wire.counters_present & CounterSet::ALL.0),
    };
    sample.validate().map_err(|e| e.to_string())?;
    Ok(sample)
}

/// Converts a core sample to its wire form.
pub fn sample_to_wire(sample: &UsageSample) -> v1::UsageSample {
    let state = match sample.state {
        LifecycleState::Running => v1::LifecycleState::Running,
        LifecycleState::Suspended => v1::LifecycleState::Suspended,
        LifecycleState::Stopped => v1::LifecycleState::Stopped,
    };
    v1::UsageSample {
        customer: sample.customer.to_string(),
        sandbox: sample.sandbox.to_string(),
        node: sample.node.to_string(),
        epoch: sample.epoch.0,
        seq: sample.seq,
        ts_unix_ms: sample.ts.timestamp_millis(),
        state: state as i32,
        vcpu_milli: sample.vcpu.0,
        mem_bytes: sample.mem_bytes,
        gpu_model: sample.gpu_model.clone().unwrap_or_default(),
        gpu_count: sample.gpu_count,
        disk_bytes: sample.disk_bytes,
        cpu_used_usec: sample.cpu_used_usec,
        net_rx_bytes: sample.net_rx_bytes,
        net_tx_bytes: sample.net_tx_bytes,
        vcpu_alloc_usec: sample.vcpu_alloc_usec,
        mem_alloc_kib_ms: sample.mem_alloc_kib_ms,
        mem_used_kib_ms: sample.mem_used_kib_ms,
        gpu_alloc_ms: sample.gpu_alloc_ms,
        disk_mib_ms: sample.disk_mib_ms,
        api_calls: sample.api_calls,
        mem_used_bytes: sample.mem_used_bytes,
        exec_sessions: sample.exec_sessions,
        open_conns: sample.open_conns,
        last_api_call_unix_ms: 0,
        gpu_busy_ms: sample.detail.gpu_busy_ms,
        gpu_mem_used_bytes: sample.detail.gpu_mem_used_bytes,
        cpu_pressure_usec: sample.detail.cpu_pressure_usec,
        mem_pressure_usec: sample.detail.mem_pressure_usec,
        io_pressure_usec: sample.detail.io_pressure_usec,
        mem_peak_bytes: sample.detail.mem_peak_bytes,
        io_read_bytes: sample.detail.io_read_bytes,
        io_write_bytes: sample.detail.io_write_bytes,
        counters_present: sample.counters_present.0,
        running_ms: sample.state_counters.running_ms,
        suspended_ms: sample.state_counters.suspended_ms,
        active_ms: sample.state_counters.active_ms,
        vcpu_alloc_active_usec: sample.state_counters.vcpu_alloc_active_usec,
        vcpu_max_usec: sample.state_counters.vcpu_max_usec,
        vcpu_max_active_usec: sample.state_counters.vcpu_max_active_usec,
        cpu_used_active_usec: sample.state_counters.cpu_used_active_usec,
        mem_alloc_active_kib_ms: sample.state_counters.mem_alloc_active_kib_ms,
        mem_max_kib_ms: sample.state_counters.mem_max_kib_ms,
        mem_max_active_kib_ms: sample.state_counters.mem_max_active_kib_ms,
        mem_used_active_kib_ms: sample.state_counters.mem_used_active_kib_ms,
        gpu_alloc_active_ms: sample.state_counters.gpu_alloc_active_ms,
        disk_running_mib_ms: sample.state_counters.disk_running_mib_ms,
        disk_active_mib_ms: sample.state_counters.disk_active_mib_ms,
    }
}

/// Encodes one node's samples of one tick as a `usage.samples` message.
pub fn encode_node_batch(
    node: &NodeId,
    sent_at: DateTime<Utc>,
    batch_seq: u64,
    samples: &[UsageSample],
) -> Vec<u8> {
    v1::NodeBatch {
        schema_version: SCHEMA_VERSION,
        node: node.to_string(),
        sent_unix_ms: sent_at.timestamp_millis(),
        batch_seq,
        samples: samples.iter().map(sample_to_wire).collect(),
    }
    .encode_to_vec()
}

/// Decodes a `sandbox.commands` message, refusing unknown versions and actions.
pub fn decode_command(bytes: &[u8]) -> Result<v1::SandboxCommand, WireError> {
    let command = v1::SandboxCommand::decode(bytes)?;
    if command.schema_version != SCHEMA_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: command.schema_version,
        });
    }
    match v1::CommandAction::try_from(command.action) {
        Ok(v1::CommandAction::Unspecified) | Err(_) => Err(WireError::BadCommand(format!(
            "action {} is not suspend, resume or stop",
            command.action
        ))),
        Ok(_) => Ok(command),
    }
}

/// Kafka header of a `sandbox.commands` message carrying its signature:
/// `t=<unix seconds>,v1=<hex HMAC-SHA256>` over `"<t>.<payload>"` with the
/// cluster's command key (the format of [`idlemeter_core::signature`]).
pub const COMMAND_SIGNATURE_HEADER: &str = "idlemeter-signature";

/// The signature header value of an encoded command sent at `unix_seconds`.
pub fn sign_command(key: &[u8], unix_seconds: i64, payload: &[u8]) -> String {
    idlemeter_core::signature::sign(key, unix_seconds, payload)
}

/// Checks a received command's signature header (absent: refused) against
/// the node's key, within `tolerance_s` of `now_unix`.
pub fn verify_command(
    key: &[u8],
    header: Option<&[u8]>,
    payload: &[u8],
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), String> {
    let header = header.ok_or_else(|| "the command is not signed".to_owned())?;
    let header = std::str::from_utf8(header).map_err(|_| "the signature is not text".to_owned())?;
    idlemeter_core::signature::verify(key, header, payload, now_unix, tolerance_s)
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use idlemeter_core::Counter;

    use super::*;

    fn sample(seq: u64) -> UsageSample {
        UsageSample {
            customer: CustomerId::parse("acme").expect("id"),
            node: NodeId::parse("node-1").expect("id"),
            sandbox: SandboxId::parse("sbx-1").expect("id"),
            epoch: Epoch(3),
            seq,
            ts: DateTime::from_timestamp_millis(1_790_000_000_123).expect("ts"),
            state: LifecycleState::Running,
            vcpu: VcpuMillis(1500),
            mem_bytes: 1 << 30,
            gpu_model: Some("H100".into()),
            gpu_count: 1,
            disk_bytes: 10 << 30,
            cpu_used_usec: 42,
            net_rx_bytes: 7,
            net_tx_bytes: 8,
            vcpu_alloc_usec: 1_500_000,
            mem_alloc_kib_ms: 1,
            mem_used_kib_ms: 2,
            gpu_alloc_ms: 1000,
            disk_mib_ms: 3,
            api_calls: 4,
            mem_used_bytes: 5,
            exec_sessions: 1,
            open_conns: 2,
            detail: Default::default(),
            state_counters: Default::default(),
            counters_present: Default::default(),
        }
    }

    #[test]
    fn node_batch_round_trips_every_field() {
        let node = NodeId::parse("node-1").expect("id");
        let mut detailed = sample(2);
        detailed.detail = SampleDetail {
            gpu_busy_ms: 1,
            gpu_mem_used_bytes: 2,
            cpu_pressure_usec: 3,
            mem_pressure_usec: 4,
            io_pressure_usec: 5,
            mem_peak_bytes: 6,
            io_read_bytes: 7,
            io_write_bytes: 8,
        };
        let mut counted = sample(3);
        for (index, counter) in Counter::ALL.into_iter().enumerate() {
            counted.set_counter(counter, 1_000 + index as u64);
        }
        let sent = vec![sample(1), detailed, counted];
        let bytes = encode_node_batch(&node, Utc::now(), 9, &sent);
        let decoded = decode_node_batch(&bytes).expect("valid batch");
        assert_eq!(decoded.samples, sent);
        assert_eq!(decoded.samples[2].counters_present, CounterSet::ALL);
        assert_eq!(decoded.samples[2].state_counters.disk_active_mib_ms, 1_018);
        assert_eq!(decoded.batch_seq, 9);
        assert!(decoded.rejected.is_empty());
    }

    #[test]
    fn bad_sample_is_rejected_and_good_ones_kept() {
        let node = NodeId::parse("node-1").expect("id");
        let mut batch = v1::NodeBatch {
            schema_version: SCHEMA_VERSION,
            node: node.to_string(),
            sent_unix_ms: 0,
            batch_seq: 1,
            samples: vec![sample_to_wire(&sample(1)), sample_to_wire(&sample(2))],
        };
        batch.samples[0].sandbox.clear();
        let decoded = decode_node_batch(&batch.encode_to_vec()).expect("batch decodes");
        assert_eq!(decoded.samples.len(), 1);
        assert_eq!(decoded.samples[0].seq, 2);
        let reason = decoded.rejected[0].to_string();
        assert!(
            reason.contains("sample 0") && reason.contains("sandbox id"),
            "{reason}"
        );
    }

    #[test]
    fn garbage_and_unknown_versions_are_refused() {
        assert!(matches!(
            decode_node_batch(b"\xff\xff\xff not protobuf"),
            Err(WireError::Undecodable(_))
        ));
        let future = v1::NodeBatch {
            schema_version: 2,
            node: "n".into(),
            ..Default::default()
        };
        assert!(matches!(
            decode_node_batch(&future.encode_to_vec()),
            Err(WireError::UnsupportedVersion { found: 2 })
        ));
    }
}
