//! The running service: the consume -> decide -> act -> snapshot -> commit
//! loop, partition take-over and revocation, leases and webhook delivery.

use super::*;

/// The running service.
pub struct PolicyService {
    engine: Engine,
    policy: Policy,
    consumer: Arc<GroupConsumer>,
    lag_reader: Option<idlemeter_bus::LagReader>,
    producer: FutureProducer,
    store: Store,
    topics: Topics,
    config: PolicyConfig,
    webhook: Option<Arc<WebhookSender>>,
    metrics: PolicyMetrics,
    /// Next offset per (topic, partition) consumed since the last commit.
    consumed: HashMap<(String, i32), i64>,
    /// Seq per sandbox at the last snapshot: only changed rows are written.
    snapshotted: HashMap<(String, String), (u64, u64, i64)>,
    /// The partition each known sandbox's samples come from: its state is
    /// forgotten when that partition goes to another replica.
    partition_of: HashMap<SandboxKey, (String, i32)>,
    /// The newest lease of each sandbox this replica does not hold, applied
    /// if its samples come here (after a rebalance, or before any sample).
    pending_leases: HashMap<SandboxKey, Lease>,
    /// Leases from every partition of `sandbox.leases`.
    leases: Option<tokio::sync::mpsc::Receiver<Lease>>,
    /// The billing period budget caps count spend over (`[billing] period`).
    period: idlemeter_core::Period,
}

impl std::fmt::Debug for PolicyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyService")
            .field("policy", &self.engine.policy_version())
            .field("group_id", &self.config.group_id)
            .finish_non_exhaustive()
    }
}

impl PolicyService {
    /// Loads the policy text, restores the last snapshot of `config.group_id`
    /// from ClickHouse and subscribes. `policy_label` names the file in errors.
    pub async fn build(
        kafka: &KafkaSettings,
        store: Store,
        topics: Topics,
        config: PolicyConfig,
        policy_text: &str,
        registry: &Registry,
    ) -> Result<Self> {
        let policy = Policy::from_toml(policy_text, &config.file)?;
        let webhook = if config.webhook_url.is_empty() {
            None
        } else if config.webhook_secret.is_empty() {
            return Err(Error::UnsignedWebhook);
        } else {
            Some(Arc::new(WebhookSender::new(
                &config.webhook_url,
                config.webhook_secret.expose(),
            )?))
        };
        // No state is restored here: a sandbox's state is read from the
        // snapshots when its first sample reaches this replica (see
        // `take_over`), so a replica holds only the sandboxes of its
        // partitions, as their last owner left them.
        tracing::info!(policy = %policy.version_label(), "policy loaded");
        let engine = Engine::new(policy.clone());
        if config.command_key.is_empty() {
            tracing::warn!("policy.command_key is not set: commands go out unsigned and collectors refuse them");
        }
        let client_id = format!("idlemeter-policy-{}", std::process::id());
        let consumer = kafka.prompt_consumer(&client_id, &config.group_id)?;
        consumer
            .subscribe(&[topics.samples.as_str()])
            .map_err(|source| Error::Kafka {
                context: "subscribe",
                source,
            })?;
        kafka
            .ensure_topics(&[(topics.leases.as_str(), topics.partitions)])
            .await?;
        let lookback_ms = i64::try_from(config.lease_lookback_s)
            .unwrap_or(i64::MAX / 2_000)
            .saturating_mul(1000);
        let lease_consumer = kafka.replay_consumer(
            &format!("{client_id}-leases"),
            &topics.leases,
            Utc::now().timestamp_millis() - lookback_ms,
        )?;
        let metrics = PolicyMetrics::register(registry)?;
        let (lease_sender, leases) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(read_leases(lease_consumer, lease_sender, metrics.clone()));
        Ok(Self {
            engine,
            policy,
            consumer: Arc::new(consumer),
            lag_reader: Some(kafka.lag_reader(&config.group_id)?),
            producer: kafka.producer(&client_id)?,
            store,
            topics,
            config,
            webhook,
            metrics,
            consumed: HashMap::new(),
            snapshotted: HashMap::new(),
            partition_of: HashMap::new(),
            pending_leases: HashMap::new(),
            leases: Some(leases),
            period: idlemeter_core::Period::Month,
        })
    }

    /// Budget caps count spend over this billing period (`[billing]
    /// period`, the rater's and the invoicer's); a month unless told.
    pub fn with_period(mut self, period: idlemeter_core::Period) -> Self {
        self.period = period;
        self
    }

    /// Runs until `shutdown` completes, then snapshots and commits once more.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let stop = idlemeter_telemetry::stop_on(shutdown);
        if let Some(lag) = self.lag_reader.take() {
            let consumer = Arc::downgrade(&self.consumer);
            idlemeter_telemetry::follow_gauge(
                self.metrics.lag_messages.clone(),
                Duration::from_secs(5),
                move || lag.lag_of(&consumer).into(),
                stop.clone().cancelled_owned(),
            );
        }
        tracing::info!(
            policy = %self.engine.policy_version(),
            samples = %self.topics.samples,
            leases = %self.topics.leases,
            "policy service started"
        );
        let spend_limits = self.policy.spend_limits();
        let spend_period = Duration::from_secs(self.config.spend_poll_interval_s.max(1));
        let mut spend_every = tokio::time::interval(spend_period);
        spend_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let budget_caps = self.config.spend_poll_interval_s > 0 && !spend_limits.is_empty();
        let mut emit_failed = false;
        let mut snapshot_every = tokio::time::interval(Duration::from_millis(
            self.config.snapshot_interval_ms.max(100),
        ));
        snapshot_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leases = self
            .leases
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
        let consumer = Arc::clone(&self.consumer);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = snapshot_every.tick() => self.checkpoint(&stop).await,
                _ = spend_every.tick(), if budget_caps => self.read_spend(&spend_limits).await,
                Some(lease) = leases.recv() => {
                    let decisions = self.on_lease(lease);
                    if !decisions.is_empty() && !self.emit(decisions, &stop).await {
                        emit_failed = true;
                        break;
                    }
                }
                received = consumer.recv() => match received {
                    Ok(message) => {
                        let mut batch = Vec::new();
                        self.receive(&message, &mut batch);
                        drop(message);
                        // Gather whatever else is already waiting (up to
                        // GATHER), so one Kafka flush and one ClickHouse insert
                        // carry the decisions of many messages.
                        let deadline = tokio::time::Instant::now() + GATHER;
                        while let Ok(Ok(message)) =
                            tokio::time::timeout_at(deadline, consumer.recv()).await
                        {
                            self.receive(&message, &mut batch);
                        }
                        let Some(mut decisions) = self.take_over(&batch, &stop).await else {
                            break;
                        };
                        let mut positions = Vec::with_capacity(batch.len());
                        for received in batch {
                            for sample in &received.samples {
                                self.partition_of.insert(
                                    (sample.customer.clone(), sample.sandbox.clone()),
                                    received.partition.clone(),
                                );
                            }
                            for sample in received.samples {
                                decisions.extend(self.engine.observe(&Input::Sample(sample)));
                            }
                            positions.push((received.partition, received.next_offset));
                        }
                        if !decisions.is_empty() && !self.emit(decisions, &stop).await {
                            // Stopped with decisions unsent: the engine state
                            // already counts them, so it must not be
                            // snapshotted; the restart replays from the last
                            // commit and decides them again.
                            emit_failed = true;
                            break;
                        }
                        self.consumed.extend(positions);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka consume error; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        // A last checkpoint so a clean restart replays nothing; it gives up
        // after 10 s (ClickHouse down), leaving the replay to the restart.
        if !emit_failed {
            let give_up = CancellationToken::new();
            let cancel = give_up.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                cancel.cancel();
            });
            self.checkpoint(&give_up).await;
        }
        tracing::info!("policy service stopped");
        Ok(())
    }

    /// Feeds each capped customer's spend so far to the engine; their running
    /// sandboxes are suspended at their next sample once it reaches the limit.
    async fn read_spend(&mut self, limits: &[(CustomerId, Decimal)]) {
        for (customer, limit) in limits {
            match self.store.latest_spend(customer.as_str()).await {
                Ok(Some(spend)) => {
                    // What the period costs so far (the bill before a
                    // prepaid wallet pays: what alerts compare too). The
                    // rater's latest period may still be the last one for a
                    // while after the period turns: that spend does not
                    // count against this period's limit.
                    let current = self.period.start_of(Utc::now()).timestamp();
                    let as_of = spend.as_of;
                    let amount = if i64::from(spend.period_start) == current {
                        spend.spend
                    } else {
                        Decimal::ZERO
                    };
                    if amount >= *limit {
                        tracing::info!(%customer, %amount, %limit, "spend limit reached");
                    }
                    self.engine.observe(&Input::Spend(Spend {
                        customer: customer.clone(),
                        at: DateTime::from_timestamp(i64::from(as_of), 0).unwrap_or_default(),
                        amount,
                    }));
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%customer, %error, "could not read spend; budget cap not updated")
                }
            }
        }
    }

    /// Decodes one message of the samples topic into `batch`, after
    /// following any rebalance since the last message.
    fn receive(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        batch: &mut Vec<Received>,
    ) {
        self.follow_revocations(batch);
        let Some(skipped) = self.consumer.context().admit(message) else {
            return;
        };
        self.metrics.offsets_skipped.inc_by(skipped);
        if let Some(produced_ms) = message.timestamp().to_millis() {
            let delay_ms = (Utc::now().timestamp_millis() - produced_ms).max(0);
            self.metrics
                .consume_delay_seconds
                .observe(delay_ms as f64 / 1000.0);
        }
        let samples = match decode_node_batch(message.payload().unwrap_or_default()) {
            Ok(decoded) => {
                self.metrics
                    .samples_observed
                    .inc_by(decoded.samples.len() as u64);
                decoded.samples
            }
            Err(error) => {
                self.metrics.messages_refused.inc();
                tracing::debug!(partition = message.partition(), offset = message.offset(), %error, "not a node batch; skipped");
                Vec::new()
            }
        };
        batch.push(Received {
            partition: (message.topic().to_owned(), message.partition()),
            next_offset: message.offset() + 1,
            samples,
        });
    }

    /// Partitions taken from this replica: their sandboxes are forgotten
    /// (the new owner continues from their snapshots and replays from the
    /// last commit), and what was received or consumed from them and not
    /// yet acted on is dropped.
    fn follow_revocations(&mut self, batch: &mut Vec<Received>) {
        let revoked = self.consumer.context().take_revoked();
        if revoked.is_empty() {
            return;
        }
        let revoked: std::collections::HashSet<(String, i32)> = revoked.into_iter().collect();
        batch.retain(|received| !revoked.contains(&received.partition));
        self.consumed
            .retain(|partition, _| !revoked.contains(partition));
        let gone: Vec<SandboxKey> = self
            .partition_of
            .iter()
            .filter(|(_, partition)| revoked.contains(*partition))
            .map(|(key, _)| key.clone())
            .collect();
        for (customer, sandbox) in &gone {
            self.engine.forget(customer, sandbox);
            self.partition_of
                .remove(&(customer.clone(), sandbox.clone()));
            self.snapshotted
                .remove(&(customer.as_str().to_owned(), sandbox.as_str().to_owned()));
        }
        tracing::info!(
            partitions = revoked.len(),
            sandboxes = gone.len(),
            "partitions revoked; their sandboxes' state is left to the next owner"
        );
    }

    /// Reads the snapshots of the sandboxes in `batch` this replica does not
    /// hold yet (new to it: its first start, or a partition it gained), and
    /// applies the leases it kept for them; returns the leases' decisions.
    /// Retries while ClickHouse fails; `None` if stopped first.
    async fn take_over(
        &mut self,
        batch: &[Received],
        stop: &CancellationToken,
    ) -> Option<Vec<Decision>> {
        let mut unknown: Vec<SandboxKey> = batch
            .iter()
            .flat_map(|received| &received.samples)
            .filter(|sample| {
                self.engine
                    .sandbox(&sample.customer, &sample.sandbox)
                    .is_none()
            })
            .map(|sample| (sample.customer.clone(), sample.sandbox.clone()))
            .collect();
        unknown.sort();
        unknown.dedup();
        if unknown.is_empty() {
            return Some(Vec::new());
        }
        let since_ms = Utc::now().timestamp_millis()
            - i64::try_from(self.config.forget_after_s).unwrap_or(i64::MAX / 2_000) * 1000;
        let names: Vec<&str> = unknown
            .iter()
            .map(|(_, sandbox)| sandbox.as_str())
            .collect();
        let mut backoff = Duration::from_millis(100);
        let rows = loop {
            match self
                .store
                .policy_state_of(&self.config.group_id, since_ms, &names)
                .await
            {
                Ok(rows) => break rows,
                Err(error) => {
                    tracing::warn!(%error, "could not read sandboxes' snapshots; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let wanted: std::collections::HashSet<&SandboxKey> = unknown.iter().collect();
        let mut restored = 0;
        for row in rows {
            let state: SandboxState = match serde_json::from_str(&row.state) {
                Ok(state) => state,
                Err(error) => {
                    // Decided from its next samples instead, as a new sandbox.
                    tracing::warn!(customer = %row.customer, sandbox = %row.sandbox, %error, "snapshot row unreadable; starting the sandbox afresh");
                    continue;
                }
            };
            if !wanted.contains(&(state.customer.clone(), state.sandbox.clone())) {
                continue;
            }
            self.snapshotted
                .insert((row.customer, row.sandbox), state.version());
            self.engine.adopt(state);
            restored += 1;
        }
        if restored > 0 {
            tracing::debug!(restored, "sandboxes taken over from their snapshots");
        }
        let mut decisions = Vec::new();
        for key in &unknown {
            let Some(lease) = self.pending_leases.remove(key) else {
                continue;
            };
            let held = self
                .engine
                .sandbox(&key.0, &key.1)
                .and_then(|state| state.lease.as_ref())
                .and_then(|lease| lease.at);
            // A lease kept here that the snapshot already has (or one older
            // than the snapshot's) would undo a later one.
            if held.is_none() || lease.at > held {
                decisions.extend(self.engine.observe(&Input::Lease(lease)));
            }
        }
        Some(decisions)
    }

    /// A lease: applied if this replica holds the sandbox, else kept in case
    /// it comes here.
    fn on_lease(&mut self, lease: Lease) -> Vec<Decision> {
        // A revocation since the last sample first: a sandbox that went
        // elsewhere is not this replica's to change (or to snapshot).
        self.follow_revocations(&mut Vec::new());
        let key = (lease.customer.clone(), lease.sandbox.clone());
        if self.engine.sandbox(&key.0, &key.1).is_some() {
            self.engine.observe(&Input::Lease(lease))
        } else {
            self.pending_leases.insert(key, lease);
            Vec::new()
        }
    }

    /// Sends commands and stores decision rows, retrying until both are
    /// acknowledged; false if stopped first.
    async fn emit(&self, decisions: Vec<Decision>, stop: &CancellationToken) -> bool {
        let now = Utc::now();
        let rows: Vec<DecisionRow> = decisions.iter().map(|d| decision_row(d, now)).collect();
        let stale_after = chrono::Duration::seconds(
            i64::try_from(self.config.stale_after_s).unwrap_or(i64::MAX / 2_000),
        );
        let (decisions, stale): (Vec<Decision>, Vec<Decision>) =
            decisions.into_iter().partition(|decision| {
                self.config.stale_after_s == 0 || now - decision.at <= stale_after
            });
        if !stale.is_empty() {
            self.metrics.stale_decisions.inc_by(stale.len() as u64);
            tracing::debug!(count = stale.len(), "stale decisions recorded, not sent");
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_emit(&decisions, &rows).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "emitting decisions failed");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let acknowledged = Utc::now();
        for decision in &decisions {
            self.metrics
                .decisions
                .with_label_values(&[decision.rule.as_str(), decision.action.as_str()])
                .inc();
            let delay = (acknowledged - decision.at).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.decision_delay_seconds.observe(delay);
            tracing::info!(
                customer = %decision.customer,
                sandbox = %decision.sandbox,
                rule = decision.rule.as_str(),
                action = decision.action.as_str(),
                attempt = decision.attempt,
                reason = %decision.reason,
                "decision"
            );
            if let Some(webhook) = &self.webhook {
                spawn_delivery(Arc::clone(webhook), decision, self.metrics.clone());
            }
        }
        true
    }

    async fn try_emit(&self, decisions: &[Decision], rows: &[DecisionRow]) -> Result<()> {
        let sends = decisions
            .iter()
            .filter(|decision| decision.action != Action::Notify)
            .map(|decision| {
                let payload = prost::Message::encode_to_vec(&command_of(decision));
                let producer = self.producer.clone();
                let topic = self.topics.commands.clone();
                let key = decision.node.as_str().to_owned();
                // Signed at sending: the node checks the key and the time.
                let signature = (!self.config.command_key.is_empty()).then(|| {
                    idlemeter_proto::sign_command(
                        self.config.command_key.expose().as_bytes(),
                        Utc::now().timestamp(),
                        &payload,
                    )
                });
                async move {
                    let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
                    if let Some(signature) = &signature {
                        record = record.headers(rdkafka::message::OwnedHeaders::new().insert(
                            rdkafka::message::Header {
                                key: idlemeter_proto::COMMAND_SIGNATURE_HEADER,
                                value: Some(signature.as_str()),
                            },
                        ));
                    }
                    producer
                        .send(record, Duration::from_secs(10))
                        .await
                        .map_err(|(source, _)| Error::Kafka {
                            context: "send command",
                            source,
                        })
                }
            });
        // Commands and rows go out together; a retry after a partial failure
        // sends both again, which the command ids and the row keys absorb.
        let (sent, stored) = tokio::join!(
            futures::future::join_all(sends),
            self.store.insert_decisions(rows)
        );
        for result in sent {
            result?;
            self.metrics.commands_sent.inc();
        }
        stored?;
        Ok(())
    }

    /// Writes changed sandbox states, then commits what was consumed before.
    async fn checkpoint(&mut self, stop: &CancellationToken) {
        // Never snapshot a sandbox whose partition went elsewhere: its next
        // owner writes its rows now.
        self.follow_revocations(&mut Vec::new());
        let to_commit = std::mem::take(&mut self.consumed);
        let horizon = Utc::now()
            - chrono::Duration::seconds(
                i64::try_from(self.config.forget_after_s).unwrap_or(i64::MAX / 2_000),
            );
        let lookback = chrono::Duration::seconds(
            i64::try_from(self.config.lease_lookback_s).unwrap_or(i64::MAX / 2_000),
        );
        let oldest_kept = Utc::now() - lookback;
        self.pending_leases
            .retain(|_, lease| lease.at.unwrap_or(lease.until).max(lease.until) > oldest_kept);
        if self.engine.forget_quiet(horizon) > 0 {
            let engine = &self.engine;
            self.partition_of
                .retain(|(customer, sandbox), _| engine.sandbox(customer, sandbox).is_some());
            // Their rows stay in policy_state; restore skips rows older than the horizon.
            let engine = &self.engine;
            self.snapshotted.retain(|(customer, sandbox), _| {
                match (
                    idlemeter_core::CustomerId::parse(customer.clone()),
                    idlemeter_core::SandboxId::parse(sandbox.clone()),
                ) {
                    (Ok(customer), Ok(sandbox)) => engine.sandbox(&customer, &sandbox).is_some(),
                    _ => false,
                }
            });
        }
        let snapshot = self.engine.snapshot();
        self.metrics
            .sandboxes_tracked
            .set(snapshot.sandboxes.len() as i64);
        let snapshot_ms = Utc::now().timestamp_millis();
        let mut rows = Vec::new();
        let mut written = Vec::new();
        for state in &snapshot.sandboxes {
            let key = (
                state.customer.as_str().to_owned(),
                state.sandbox.as_str().to_owned(),
            );
            let version = state.version();
            if self.snapshotted.get(&key) == Some(&version) {
                continue;
            }
            let json = serde_json::to_string(state).expect("engine state serialises");
            rows.push(PolicyStateRow {
                group_id: self.config.group_id.clone(),
                customer: key.0.clone(),
                sandbox: key.1.clone(),
                snapshot_ms,
                state: json,
            });
            written.push((key, version));
        }
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = self.store.insert_policy_state(&rows).await {
            tracing::warn!(%error, "snapshot failed; offsets stay uncommitted");
            if stop.is_cancelled() {
                self.consumed.extend(to_commit);
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.snapshotted.extend(written);
        self.metrics.snapshots.inc();
        if to_commit.is_empty() {
            return;
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &to_commit {
            if let Err(error) =
                offsets.add_partition_offset(topic, *partition, Offset::Offset(*next))
            {
                tracing::warn!(%error, "offset not committable");
            }
        }
        // Only what this replica still holds: a revoked partition's offset
        // is its new owner's to commit.
        let offsets = self.consumer.context().held_only(&offsets);
        if offsets.count() == 0 {
            return;
        }
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Sync) {
            // Typically a rebalance: the new owner replays from the last commit.
            tracing::warn!(%error, "offset commit failed; the tail will be replayed");
        }
    }
}

pub(crate) type SandboxKey = (CustomerId, idlemeter_core::SandboxId);

/// One message of the samples topic, decoded.
#[derive(Debug)]
pub(crate) struct Received {
    partition: (String, i32),
    next_offset: i64,
    samples: Vec<idlemeter_core::UsageSample>,
}

/// Reads every lease into `sender` until the service goes. The lease's
/// event time is the message's timestamp when the sender did not give one.
pub(crate) async fn read_leases(
    consumer: GroupConsumer,
    sender: tokio::sync::mpsc::Sender<Lease>,
    metrics: PolicyMetrics,
) {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "lease consume error; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Every replica reads every lease from the time its state starts at.
        let skipped = consumer.context().skipped_before(
            message.topic(),
            message.partition(),
            message.offset(),
        );
        metrics.offsets_skipped.inc_by(skipped);
        match decode_lease(message.payload().unwrap_or_default()) {
            Ok(mut lease) => {
                metrics.leases_observed.inc();
                if lease.at.is_none() {
                    lease.at = message
                        .timestamp()
                        .to_millis()
                        .and_then(chrono::DateTime::from_timestamp_millis);
                }
                if sender.send(lease).await.is_err() {
                    return;
                }
            }
            Err(reason) => {
                metrics.messages_refused.inc();
                tracing::warn!(partition = message.partition(), offset = message.offset(), %reason, "lease refused");
            }
        }
    }
}

pub(crate) fn spawn_delivery(
    webhook: Arc<WebhookSender>,
    decision: &Decision,
    metrics: PolicyMetrics,
) {
    let body = serde_json::to_vec(decision).expect("decisions serialise");
    let id = decision.id.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=4 {
            match webhook
                .post(&id, body.clone(), Utc::now().timestamp())
                .await
            {
                Ok(()) => return,
                Err(error) if attempt == 4 => {
                    metrics.webhook_failures.inc();
                    tracing::warn!(decision = %id, %error, "webhook delivery failed; the decision is in policy_decisions");
                }
                Err(error) => {
                    tracing::debug!(decision = %id, %error, attempt, "webhook delivery failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    });
}
