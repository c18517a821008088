//! A synthetic fleet: N sandboxes over M nodes that behave like AI-agent
//! sandboxes (bursts of work, long low-CPU jobs with an open session, idle
//! stretches, the odd GPU) and emit the samples a collector would.
//!
//! Deterministic: the same seed and the same tick times give the same samples,
//! so a benchmark or a test can know in advance every counter it sent. No clock
//! is read here; the caller passes the time of each tick.

use chrono::{DateTime, Utc};
use idlemeter_core::{
    CounterSet, CustomerId, Epoch, LifecycleState, NodeId, SandboxId, UsageSample, VcpuMillis,
};

/// Shape of the simulated fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetShape {
    pub sandboxes: usize,
    pub nodes: usize,
    pub customers: usize,
    pub seed: u64,
    /// Epoch of every sandbox's counters. A restarted simulator must use a new
    /// one (as a real collector does after a sandbox restart): its counters
    /// start again from zero and would otherwise collide with the old run's.
    pub epoch: u64,
}

/// What a sandbox is doing this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    Burst,
    LongJobWithSession,
    Idle,
    Suspended,
}

#[derive(Debug, Clone)]
struct SimulatedSandbox {
    sample: UsageSample,
    activity: Activity,
    /// Ticks left in the current activity.
    remaining_ticks: u32,
    last_tick: Option<DateTime<Utc>>,
}

/// The fleet and its per-sandbox counters.
#[derive(Debug, Clone)]
pub struct Fleet {
    sandboxes: Vec<SimulatedSandbox>,
    nodes: Vec<NodeId>,
    rng: SplitMix64,
}

impl Fleet {
    pub fn new(shape: FleetShape) -> Self {
        let mut rng = SplitMix64(shape.seed);
        let nodes: Vec<NodeId> = (0..shape.nodes.max(1))
            .map(|index| {
                NodeId::parse(format!("node-{index:04}")).expect("generated ids are valid")
            })
            .collect();
        let sandboxes = (0..shape.sandboxes)
            .map(|index| {
                let customer = index % shape.customers.max(1);
                let has_gpu = rng.below(20) == 0;
                let vcpu = [1000, 2000, 4000, 8000][rng.below(4) as usize];
                SimulatedSandbox {
                    sample: UsageSample {
                        vcpu: VcpuMillis(vcpu),
                        mem_bytes: u64::from(vcpu / 1000) * 2 * (1 << 30),
                        gpu_model: has_gpu.then(|| "H100".to_owned()),
                        gpu_count: u32::from(has_gpu),
                        disk_bytes: 10 * (1 << 30),
                        counters_present: CounterSet::ALL,
                        ..UsageSample::blank(
                            CustomerId::parse(format!("cust-{customer:05}"))
                                .expect("generated ids are valid"),
                            nodes[index % nodes.len()].clone(),
                            SandboxId::parse(format!("sbx-{index:07}"))
                                .expect("generated ids are valid"),
                            Epoch(shape.epoch),
                            0,
                            DateTime::UNIX_EPOCH,
                        )
                    },
                    activity: Activity::Burst,
                    remaining_ticks: 0,
                    last_tick: None,
                }
            })
            .collect();
        Self {
            sandboxes,
            nodes,
            rng,
        }
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// Advances every sandbox to `now` and returns one batch of samples per node,
    /// in node order. The first tick of a sandbox is its epoch's baseline.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<(NodeId, Vec<UsageSample>)> {
        let mut per_node: Vec<Vec<UsageSample>> = vec![Vec::new(); self.nodes.len()];
        for (index, sandbox) in self.sandboxes.iter_mut().enumerate() {
            advance(sandbox, now, &mut self.rng);
            per_node[index % self.nodes.len()].push(sandbox.sample.clone());
        }
        self.nodes.iter().cloned().zip(per_node).collect()
    }
}

fn advance(sandbox: &mut SimulatedSandbox, now: DateTime<Utc>, rng: &mut SplitMix64) {
    if sandbox.remaining_ticks == 0 {
        sandbox.activity = match rng.below(10) {
            0..=2 => Activity::Burst,
            3..=4 => Activity::LongJobWithSession,
            5..=7 => Activity::Idle,
            _ => Activity::Suspended,
        };
        sandbox.remaining_ticks = 5 + rng.below(60) as u32;
    }
    sandbox.remaining_ticks -= 1;
    // Integrated over the millisecond timestamps the samples carry, as the
    // collector does: the counters' time then agrees with the timestamps to
    // the millisecond, interval by interval.
    let now = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
    let elapsed_ms = sandbox
        .last_tick
        .map(|last| (now - last).num_milliseconds().max(0) as u64)
        .unwrap_or(0);
    sandbox.last_tick = Some(now);
    let sample = &mut sandbox.sample;
    let vcpu_milli = u64::from(sample.vcpu.0);
    let (state, cpu_share_permille, sessions, conns) = match sandbox.activity {
        Activity::Burst => (LifecycleState::Running, 600 + rng.below(400), 1, 2),
        Activity::LongJobWithSession => (LifecycleState::Running, 20 + rng.below(30), 1, 0),
        Activity::Idle => (LifecycleState::Running, rng.below(5), 0, 0),
        Activity::Suspended => (LifecycleState::Suspended, 0, 0, 0),
    };
    sample.seq += 1;
    sample.ts = now;
    sample.state = state;
    sample.exec_sessions = sessions;
    sample.open_conns = conns;
    let disk_mib_ms = (sample.disk_bytes >> 20) * elapsed_ms;
    sample.disk_mib_ms += disk_mib_ms;
    if state != LifecycleState::Running {
        sample.state_counters.suspended_ms += elapsed_ms;
        return;
    }
    // vCPU-milli x ms = vCPU-microseconds.
    let allocated_usec = vcpu_milli * elapsed_ms;
    let used_usec = allocated_usec * cpu_share_permille / 1000;
    sample.vcpu_alloc_usec += allocated_usec;
    sample.cpu_used_usec += used_usec;
    sample.mem_used_bytes =
        sample.mem_bytes / 4 + (sample.mem_bytes / 2) * cpu_share_permille / 1000;
    let mem_alloc_kib_ms = (sample.mem_bytes >> 10) * elapsed_ms;
    let mem_used_kib_ms = (sample.mem_used_bytes >> 10) * elapsed_ms;
    let gpu_ms = u64::from(sample.gpu_count) * elapsed_ms;
    sample.mem_alloc_kib_ms += mem_alloc_kib_ms;
    sample.mem_used_kib_ms += mem_used_kib_ms;
    sample.gpu_alloc_ms += gpu_ms;
    sample.net_rx_bytes += cpu_share_permille * 1_000;
    sample.net_tx_bytes += cpu_share_permille * 300;
    sample.api_calls += u64::from(sessions);
    // The collector's counters by state: allocation never below use here,
    // so max(requested, used) is the allocation.
    let counters = &mut sample.state_counters;
    counters.running_ms += elapsed_ms;
    counters.vcpu_max_usec += allocated_usec.max(used_usec);
    counters.mem_max_kib_ms += mem_alloc_kib_ms.max(mem_used_kib_ms);
    counters.disk_running_mib_ms += disk_mib_ms;
    if sessions > 0 || conns > 0 {
        counters.active_ms += elapsed_ms;
        counters.vcpu_alloc_active_usec += allocated_usec;
        counters.vcpu_max_active_usec += allocated_usec.max(used_usec);
        counters.cpu_used_active_usec += used_usec;
        counters.mem_alloc_active_kib_ms += mem_alloc_kib_ms;
        counters.mem_max_active_kib_ms += mem_alloc_kib_ms.max(mem_used_kib_ms);
        counters.mem_used_active_kib_ms += mem_used_kib_ms;
        counters.gpu_alloc_active_ms += gpu_ms;
        counters.disk_active_mib_ms += disk_mib_ms;
    }
}

/// A small, fast, seedable generator (SplitMix64); simulation needs no crypto.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_only_rise_and_suspended_sandboxes_use_no_cpu() {
        let mut fleet = Fleet::new(FleetShape {
            sandboxes: 50,
            nodes: 3,
            customers: 7,
            seed: 1,
            epoch: 1,
        });
        let start = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let mut previous: Vec<UsageSample> = Vec::new();
        for second in 0..120 {
            let batches = fleet.tick(start + chrono::Duration::seconds(second));
            let current: Vec<UsageSample> = batches
                .into_iter()
                .flat_map(|(_, samples)| samples)
                .collect();
            for (before, after) in previous.iter().zip(&current) {
                assert!(after.cpu_used_usec >= before.cpu_used_usec);
                assert!(after.vcpu_alloc_usec >= before.vcpu_alloc_usec);
                assert!(after.cpu_used_usec <= after.vcpu_alloc_usec);
                assert_eq!(after.seq, before.seq + 1);
                if after.state == LifecycleState::Suspended {
                    assert_eq!(after.cpu_used_usec, before.cpu_used_usec);
                }
            }
            previous = current;
        }
        assert!(previous.iter().any(|s| s.cpu_used_usec > 0));
    }

    #[test]
    fn same_seed_same_samples() {
        let shape = FleetShape {
            sandboxes: 10,
            nodes: 2,
            customers: 2,
            seed: 9,
            epoch: 1,
        };
        let time = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let (mut a, mut b) = (Fleet::new(shape), Fleet::new(shape));
        a.tick(time);
        b.tick(time);
        let later = time + chrono::Duration::seconds(1);
        assert_eq!(a.tick(later), b.tick(later));
    }
}
