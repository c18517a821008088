//! Every decoder of outside input, fed arbitrary bytes (and mutations of
//! valid input): it answers an error or a value, never a panic, never a
//! hang, and never allocates more than a stated bound. Stable Rust: proptest
//! drives the inputs, an instrumented allocator (`stats_alloc`) measures
//! each decode.
//!
//! Decoders: protobuf node batch → samples, sandbox commands, JSONL
//! samples, price sheets, idle policy files, API query strings.
//!
//! The bound: decoding an input of `n` bytes allocates at most
//! `ALLOCATION_BASE + ALLOCATION_PER_BYTE * n` bytes in all (1 MiB + 256
//! per input byte; counted cumulatively, so the peak is lower). A decoder
//! that trusted a length prefix would break it. The hang bound is proptest's per-case timeout (5 s).
//! Cases per decoder: 4,096 (a few seconds each), or
//! `IDLEMETER_FUZZ_CASES`.

use proptest::prelude::*;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

const ALLOCATION_BASE: usize = 1 << 20;
const ALLOCATION_PER_BYTE: usize = 256;

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Runs `decode` on `input`, failing if it allocated more than the bound.
/// Counted process-wide: nextest runs each test in its own process, and
/// proptest runs one case at a time.
fn within_bound<T>(what: &str, input: &[u8], decode: impl FnOnce(&[u8]) -> T) -> T {
    let region = Region::new(GLOBAL);
    let result = decode(input);
    let change = region.change();
    let allocated = change.bytes_allocated + usize::try_from(change.bytes_reallocated).unwrap_or(0);
    let bound = ALLOCATION_BASE + ALLOCATION_PER_BYTE * input.len();
    assert!(
        allocated <= bound,
        "{what}: {allocated} bytes allocated for {} input bytes (bound {bound})",
        input.len()
    );
    result
}

fn config() -> ProptestConfig {
    let cases = std::env::var("IDLEMETER_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases,
        timeout: 5_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid node batch, for mutation.
fn valid_batch() -> Vec<u8> {
    let samples: Vec<_> = (1..=5u64)
        .map(|seq| {
            idlemeter_tests::counted(idlemeter_tests::sample(
                "sbx-1",
                1,
                seq,
                chrono::DateTime::from_timestamp(1_790_000_000 + seq as i64, 0).expect("time"),
                seq * 1_000,
                seq,
            ))
        })
        .collect();
    idlemeter_proto::encode_node_batch(
        &idlemeter_core::NodeId::parse("node-1").expect("id"),
        chrono::DateTime::from_timestamp(1_790_000_000, 0).expect("time"),
        1,
        &samples,
    )
}

/// `base` with some bytes replaced, inserted or removed.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    proptest::collection::vec((0..len.max(1), any::<u8>(), 0..3u8), 1..16).prop_map(move |edits| {
        let mut bytes = base.clone();
        for (at, byte, kind) in edits {
            let at = at.min(bytes.len());
            match kind {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.push(byte),
            }
        }
        bytes
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn node_batches_of_arbitrary_bytes_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = within_bound("node batch", &bytes, idlemeter_proto::decode_node_batch);
    }

    #[test]
    fn mutated_node_batches_decode_or_refuse(bytes in mutated(valid_batch())) {
        if let Ok(decoded) = within_bound("node batch", &bytes, idlemeter_proto::decode_node_batch) {
            // What decodes is valid: every kept sample passes validation.
            for sample in &decoded.samples {
                prop_assert!(sample.validate().is_ok());
            }
        }
    }

    #[test]
    fn commands_of_arbitrary_bytes_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = within_bound("command", &bytes, idlemeter_proto::decode_command);
    }

    #[test]
    fn jsonl_of_arbitrary_text_parses_or_refuses(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let text = text(&bytes);
        let parsed = within_bound("jsonl", text.as_bytes(), |_| idlemeter_core::jsonl::parse_samples(&text));
        let _ = parsed;
    }

    #[test]
    fn jsonl_lines_close_to_valid_parse_or_refuse(
        line in mutated(br#"{"ts": "2026-11-02T09:00:01Z", "customer": "acme", "node": "node-1", "sandbox": "s1", "epoch": 1, "seq": 2, "state": "running", "vcpu": 2, "mem_bytes": 1024, "gpu_model": null, "gpu_count": 0, "disk_bytes": 0, "cpu_used_usec": 5, "mem_used_bytes": 0, "net_rx_bytes": 0, "net_tx_bytes": 0, "exec_sessions": 0, "open_conns": 0}"#.to_vec())
    ) {
        let text = text(&line);
        let _ = within_bound("jsonl line", text.as_bytes(), |_| idlemeter_core::jsonl::parse_sample(&text));
    }

    #[test]
    fn price_sheets_of_arbitrary_text_load_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let text = text(&bytes);
        let _ = within_bound("price sheet", text.as_bytes(), |_| idlemeter_core::PriceSheet::from_toml(&text, "fuzz.toml"));
    }

    #[test]
    fn price_sheets_close_to_real_ones_load_or_refuse(
        bytes in mutated(include_bytes!("../../prices/e2b.toml").to_vec())
    ) {
        let text = text(&bytes);
        let _ = within_bound("price sheet", text.as_bytes(), |_| idlemeter_core::PriceSheet::from_toml(&text, "fuzz.toml"));
    }

    #[test]
    fn policy_files_of_arbitrary_text_load_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let text = text(&bytes);
        let _ = within_bound("policy", text.as_bytes(), |_| idlemeter_core::policy::Policy::from_toml(&text, "fuzz.toml"));
    }

    #[test]
    fn policy_files_close_to_real_ones_load_or_refuse(
        bytes in mutated(include_bytes!("../../policies/sprites.toml").to_vec())
    ) {
        let text = text(&bytes);
        let _ = within_bound("policy", text.as_bytes(), |_| idlemeter_core::policy::Policy::from_toml(&text, "fuzz.toml"));
    }

    #[test]
    fn api_query_strings_decode_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        use axum::extract::Query;
        use idlemeter_api::routes::{CostHistoryQuery, InvoiceQuery, PageQuery, SandboxQuery, UsageQuery};
        // Any bytes, percent-encoded where they must be, as a client could send.
        let query: String = bytes
            .iter()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'&' | b'=' | b'-' | b'_' | b'.' | b':' | b'%' | b'+' => (*b as char).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect();
        let Ok(uri) = format!("/x?{query}").parse::<axum::http::Uri>() else {
            return Ok(());
        };
        let bytes = query.as_bytes();
        let _ = within_bound("usage query", bytes, |_| Query::<UsageQuery>::try_from_uri(&uri).is_ok());
        let _ = within_bound("cost query", bytes, |_| Query::<CostHistoryQuery>::try_from_uri(&uri).is_ok());
        let _ = within_bound("page query", bytes, |_| Query::<PageQuery>::try_from_uri(&uri).is_ok());
        let _ = within_bound("invoice query", bytes, |_| Query::<InvoiceQuery>::try_from_uri(&uri).is_ok());
        let _ = within_bound("sandbox query", bytes, |_| Query::<SandboxQuery>::try_from_uri(&uri).is_ok());
    }
}
