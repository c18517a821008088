//! Acting on `sandbox.commands`: suspend freezes a sandbox's cgroup, resume
//! thaws it (`cgroup.freeze` on v2), stop ends its processes and removes its
//! cgroup ([`crate::cgroup::stop_sandbox`]). The acknowledgement is the state
//! change in the next samples (`suspended` / `running` / the final
//! `stopped`), which the policy reads anyway.
//!
//! Each node has its own consumer group, so every node sees every command and
//! acts only on those naming it. An offset is committed after the command was
//! acted on (or judged not to apply); a crash in between replays that command,
//! and freezing or thawing twice is harmless. Commands older than
//! `command_max_age_ms` are ignored, so a new node's group (which starts at the
//! earliest offset) does not replay old decisions, and so are commands about
//! another epoch of the sandbox than the current one: the sandbox restarted
//! since the policy decided.
//!
//! Kafka is not trusted to say who may suspend what: a command is acted on
//! only if its `idlemeter-signature` header verifies with the cluster's
//! command key (see `idlemeter_proto::verify_command`), and only for a
//! sandbox in this collector's own index, whose cgroup it found itself. The
//! ids in a command never choose a path on their own.

use std::time::Duration;

use idlemeter_bus::{GroupConsumer, KafkaSettings};
use idlemeter_core::NodeId;
use idlemeter_proto::{decode_command, v1};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Headers as _;
use rdkafka::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cgroup::{set_frozen, stop_sandbox, CgroupLayout};
use crate::metrics::CollectorMetrics;
use crate::sampler::EpochIndex;
use crate::sandbox::SandboxKey;
use crate::{Error, Result};

/// What to do about one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Freeze (`true`) or thaw (`false`) this sandbox.
    Freeze { key: SandboxKey, frozen: bool },
    /// End its processes and remove its cgroup.
    Stop { key: SandboxKey },
    /// For another node: not ours to judge.
    OtherNode,
    /// Ours, but not applied, and why.
    Ignore(String),
}

/// Decides what a command means for `node` at `now_ms`. Pure: the epochs known
/// now and the clock come in as arguments.
pub fn decide(
    command: &v1::SandboxCommand,
    node: &NodeId,
    epochs: &EpochIndex,
    now_ms: i64,
    max_age_ms: u64,
) -> Decision {
    if command.node != node.as_str() {
        return Decision::OtherNode;
    }
    let age_ms = now_ms.saturating_sub(command.issued_unix_ms);
    if u64::try_from(age_ms).is_ok_and(|age| age > max_age_ms) {
        return Decision::Ignore(format!(
            "issued {age_ms} ms ago, the limit is {max_age_ms} ms"
        ));
    }
    let key =
        match SandboxKey::from_cgroup_name(&format!("{}.{}", command.customer, command.sandbox)) {
            Ok(key) => key,
            Err(error) => return Decision::Ignore(error.to_string()),
        };
    // Only sandboxes this collector found: an id that names no sandbox of
    // this node is not acted on, whatever it says.
    let Some(current_epoch) = epochs.get(&key.cgroup_name()).copied() else {
        return Decision::Ignore(format!("{key} is not a sandbox of this node"));
    };
    // Epoch 0: whichever epoch is current (a platform's request).
    if command.epoch != 0 && command.epoch != current_epoch {
        return Decision::Ignore(format!(
            "about epoch {} but the sandbox is in epoch {current_epoch}",
            command.epoch
        ));
    }
    match v1::CommandAction::try_from(command.action) {
        Ok(v1::CommandAction::Suspend) => Decision::Freeze { key, frozen: true },
        Ok(v1::CommandAction::Resume) => Decision::Freeze { key, frozen: false },
        Ok(v1::CommandAction::Stop) => Decision::Stop { key },
        _ => Decision::Ignore(format!(
            "action {} is not supported by the collector",
            command.action
        )),
    }
}

impl CommandActor {
    /// Records `command_id` at `now_ms`; false if it was seen within the
    /// age limit. Older entries are forgotten (their commands are refused
    /// as too old anyway).
    fn first_time(&self, command_id: &str, now_ms: i64) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let horizon = now_ms.saturating_sub(i64::try_from(self.max_age_ms).unwrap_or(i64::MAX));
        if seen.len() > 1_000 {
            seen.retain(|_, at| *at >= horizon);
        }
        seen.insert(command_id.to_owned(), now_ms)
            .is_none_or(|at| at < horizon)
    }
}

/// Whether a command's signature verifies with the node's `key`, made
/// within the command age limit (either side of `now_ms`, for skew).
pub fn check_signature(
    key: &idlemeter_core::Secret,
    signature: Option<&[u8]>,
    payload: &[u8],
    now_ms: i64,
    max_age_ms: u64,
) -> std::result::Result<(), String> {
    if key.is_empty() {
        return Err("collector.command_key is not set".to_owned());
    }
    let tolerance_s = i64::try_from(max_age_ms.div_ceil(1000)).unwrap_or(i64::MAX);
    idlemeter_proto::verify_command(
        key.expose().as_bytes(),
        signature,
        payload,
        now_ms.div_euclid(1000),
        tolerance_s,
    )
}

/// Consumes commands for one node and applies them to its cgroups.
#[derive(Debug)]
pub struct CommandActor {
    pub kafka: KafkaSettings,
    pub topic: String,
    pub group_id: String,
    pub node: NodeId,
    /// Where the sandboxes' cgroups are (the sampler's layout).
    pub layout: CgroupLayout,
    pub max_age_ms: u64,
    /// The cluster's command key; empty refuses every command.
    pub key: idlemeter_core::Secret,
    pub epochs: watch::Receiver<EpochIndex>,
    pub metrics: CollectorMetrics,
    /// Command ids acted on within the age limit, with when: each command
    /// is acted on once, so a signed command captured and produced again
    /// within its age cannot undo a later one.
    pub seen: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// The sampler thread, told to sample soon after a command changed a
    /// sandbox, so the change shows within [`ACKNOWLEDGE_AFTER`].
    pub sampler: Option<std::sync::mpsc::Sender<crate::sampler::SamplerControl>>,
}

impl CommandActor {
    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) -> Result<()> {
        let consumer: GroupConsumer = self.kafka.prompt_consumer(
            &format!("idlemeter-collector-{}", self.node),
            &self.group_id,
        )?;
        consumer
            .subscribe(&[self.topic.as_str()])
            .map_err(|source| Error::Kafka {
                context: format!("subscribing to {}", self.topic),
                source,
            })?;
        tracing::info!(topic = %self.topic, group = %self.group_id, "listening for sandbox commands");
        if self.key.is_empty() {
            tracing::warn!("collector.command_key is not set: every command is refused");
        }
        loop {
            let message = tokio::select! {
                message = consumer.recv() => message,
                _ = stop.cancelled() => return Ok(()),
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "receiving commands failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let signature = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|header| header.key == idlemeter_proto::COMMAND_SIGNATURE_HEADER)
                    .and_then(|header| header.value)
            });
            self.act(message.payload().unwrap_or_default(), signature)
                .await;
            if let Err(error) = consumer.commit_message(&message, CommitMode::Async) {
                tracing::warn!(%error, "committing a command offset failed: it may be replayed");
            }
        }
    }

    async fn act(&self, payload: &[u8], signature: Option<&[u8]>) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let command = match decode_command(payload) {
            Ok(command) => command,
            Err(error) => {
                tracing::warn!(%error, "undecodable command skipped");
                return;
            }
        };
        // Other nodes' commands are theirs to verify.
        if command.node != self.node.as_str() {
            return;
        }
        if let Err(reason) = check_signature(&self.key, signature, payload, now_ms, self.max_age_ms)
        {
            self.metrics.commands_ignored.inc();
            tracing::warn!(command_id = %command.command_id, %reason, "command refused: signature");
            return;
        }
        if !self.first_time(&command.command_id, now_ms) {
            tracing::info!(command_id = %command.command_id, "command already acted on (a resend or a replay)");
            return;
        }
        let epochs = self.epochs.borrow().clone();
        match decide(&command, &self.node, &epochs, now_ms, self.max_age_ms) {
            Decision::OtherNode => {}
            Decision::Ignore(reason) => {
                self.metrics.commands_ignored.inc();
                tracing::warn!(command_id = %command.command_id, sandbox = %command.sandbox, %reason, "command ignored");
            }
            Decision::Freeze { key, frozen } => {
                let applied = set_frozen(
                    &self.layout.v2_parent,
                    &self.layout.v1_freezer_parent,
                    &key,
                    frozen,
                );
                self.report(
                    &command,
                    &key,
                    if frozen { "suspend" } else { "resume" },
                    applied,
                );
            }
            Decision::Stop { key } => {
                // Killing waits for the processes to go: off the async workers.
                let layout = self.layout.clone();
                let stopping = key.clone();
                let stopped = tokio::task::spawn_blocking(move || {
                    stop_sandbox(&layout, &stopping, STOP_WAIT)
                })
                .await
                .unwrap_or_else(|error| Err(Error::Config(format!("stop task failed: {error}"))));
                self.report(&command, &key, "stop", stopped);
            }
        }
    }

    fn report(
        &self,
        command: &v1::SandboxCommand,
        key: &SandboxKey,
        action: &str,
        result: Result<()>,
    ) {
        match result {
            Ok(()) => {
                if let Some(sampler) = &self.sampler {
                    let _ = sampler.send(crate::sampler::SamplerControl::SampleAfter(
                        ACKNOWLEDGE_AFTER,
                    ));
                }
                self.metrics.commands_applied.inc();
                tracing::info!(command_id = %command.command_id, sandbox = %key, action, reason = %command.reason, "command applied");
            }
            Err(error) => {
                self.metrics.commands_ignored.inc();
                tracing::warn!(command_id = %command.command_id, sandbox = %key, action, %error, "command could not be applied");
            }
        }
    }
}

/// How long a stop waits for the sandbox's processes to exit.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// After a command changed a sandbox, its next sample comes this soon
/// (long enough for a thawed sandbox's CPU to move) rather than at the tick.
pub const ACKNOWLEDGE_AFTER: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn command(action: v1::CommandAction, epoch: u64, issued_unix_ms: i64) -> v1::SandboxCommand {
        v1::SandboxCommand {
            schema_version: 1,
            command_id: "c-1".into(),
            node: "node-1".into(),
            customer: "acme".into(),
            sandbox: "sbx-1".into(),
            epoch,
            action: action as i32,
            reason: "idle".into(),
            policy_version: "p1".into(),
            issued_unix_ms,
        }
    }

    fn epochs() -> EpochIndex {
        Arc::new(HashMap::from([("acme.sbx-1".to_owned(), 77)]))
    }

    fn node() -> NodeId {
        NodeId::parse("node-1").expect("valid id")
    }

    #[test]
    fn suspend_and_resume_for_this_node_freeze_and_thaw() {
        let suspend = decide(
            &command(v1::CommandAction::Suspend, 77, NOW),
            &node(),
            &epochs(),
            NOW,
            60_000,
        );
        assert!(matches!(suspend, Decision::Freeze { frozen: true, .. }));
        let resume = decide(
            &command(v1::CommandAction::Resume, 0, NOW),
            &node(),
            &epochs(),
            NOW,
            60_000,
        );
        assert!(matches!(resume, Decision::Freeze { frozen: false, .. }));
    }

    #[test]
    fn commands_for_other_nodes_old_commands_and_stale_epochs_are_not_applied() {
        let mut elsewhere = command(v1::CommandAction::Suspend, 77, NOW);
        elsewhere.node = "node-2".into();
        assert_eq!(
            decide(&elsewhere, &node(), &epochs(), NOW, 60_000),
            Decision::OtherNode
        );
        let old = command(v1::CommandAction::Suspend, 77, NOW - 60_001);
        assert!(matches!(
            decide(&old, &node(), &epochs(), NOW, 60_000),
            Decision::Ignore(_)
        ));
        let stale = command(v1::CommandAction::Suspend, 76, NOW);
        assert!(
            matches!(decide(&stale, &node(), &epochs(), NOW, 60_000), Decision::Ignore(reason) if reason.contains("epoch 76"))
        );
        let stop = command(v1::CommandAction::Stop, 77, NOW);
        assert!(matches!(
            decide(&stop, &node(), &epochs(), NOW, 60_000),
            Decision::Stop { key } if key.cgroup_name() == "acme.sbx-1"
        ));
        let stale_stop = command(v1::CommandAction::Stop, 76, NOW);
        assert!(matches!(
            decide(&stale_stop, &node(), &epochs(), NOW, 60_000),
            Decision::Ignore(_)
        ));
    }

    /// Finding "forged ids reach the node's filesystem": a command whose ids
    /// walk out of the cgroup parent, or name a sandbox this collector did
    /// not find, is not acted on, whatever its epoch.
    #[test]
    fn forged_commands_never_name_a_cgroup_outside_the_index() {
        for (customer, sandbox) in [
            ("..", ".."),
            ("acme", "../../system.slice"),
            ("acme", "sbx-1/../../x"),
            ("acme", "unknown-sbx"),
            ("other", "sbx-1"),
        ] {
            for epoch in [0, 77] {
                let mut forged = command(v1::CommandAction::Suspend, epoch, NOW);
                forged.customer = customer.into();
                forged.sandbox = sandbox.into();
                assert!(
                    matches!(
                        decide(&forged, &node(), &epochs(), NOW, 60_000),
                        Decision::Ignore(_)
                    ),
                    "{customer}.{sandbox} epoch {epoch}"
                );
            }
        }
    }

    /// Finding "forged ids reach the node's filesystem": commands are signed
    /// with the cluster key and refused unsigned, mis-signed, stale or when
    /// the node has no key.
    #[test]
    fn commands_act_only_with_a_valid_signature_from_the_cluster_key() {
        let key = idlemeter_core::Secret::new("cluster-key");
        let payload = prost::Message::encode_to_vec(&command(v1::CommandAction::Suspend, 77, NOW));
        let now_s = NOW / 1000;
        let signed = idlemeter_proto::sign_command(b"cluster-key", now_s, &payload);
        assert_eq!(
            check_signature(&key, Some(signed.as_bytes()), &payload, NOW, 60_000),
            Ok(())
        );
        let forged = idlemeter_proto::sign_command(b"guessed-key", now_s, &payload);
        let mut tampered = payload.clone();
        tampered[3] ^= 1;
        let stale = idlemeter_proto::sign_command(b"cluster-key", now_s - 120, &payload);
        for (what, signature, body, node_key) in [
            ("unsigned", None, &payload, &key),
            ("another key", Some(forged.as_bytes()), &payload, &key),
            ("tampered", Some(signed.as_bytes()), &tampered, &key),
            ("stale", Some(stale.as_bytes()), &payload, &key),
            (
                "no node key",
                Some(signed.as_bytes()),
                &payload,
                &idlemeter_core::Secret::default(),
            ),
        ] {
            assert!(
                check_signature(node_key, signature, body, NOW, 60_000).is_err(),
                "{what} must be refused"
            );
        }
    }

    /// Finding "forged ids reach the node's filesystem": a signed command
    /// produced again (a resend, or a capture replayed within its age) is
    /// acted on once.
    #[test]
    fn a_command_id_is_acted_on_once_within_the_age_limit() {
        let (_sender, epochs) = watch::channel(epochs());
        let actor = CommandActor {
            kafka: KafkaSettings::default(),
            topic: "t".into(),
            group_id: "g".into(),
            node: node(),
            layout: crate::config::CollectorConfig::default().layout(),
            max_age_ms: 60_000,
            key: idlemeter_core::Secret::new("k"),
            epochs,
            metrics: CollectorMetrics::register(&prometheus::Registry::new()).expect("metrics"),
            seen: Default::default(),
            sampler: None,
        };
        assert!(actor.first_time("c-1", NOW));
        assert!(
            !actor.first_time("c-1", NOW + 59_000),
            "a replay within the age"
        );
        assert!(actor.first_time("c-2", NOW + 59_000));
        assert!(
            actor.first_time("c-1", NOW + 121_000),
            "forgotten once too old anyway"
        );
    }
}
