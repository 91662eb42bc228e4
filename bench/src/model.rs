//! The typed record of one bench run: what the bench writes
//! (target/bench.json, bench/last-run.json) and all that the report reads.
//!
//! Sections of phases that did not run are `None`. Within a section every
//! field is required: a missing one fails deserialization instead of
//! turning into a NaN in the report. Figures that can be absent in a real
//! measurement (no sample, a failed reading) are `Option` and rendered "—".
//!
//! The summaries (`Rounds`, `Steering`) are what the report shows; the
//! per-round rows they are computed from are kept in `Run::raw`.

use crate::stats::Summary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub meta: Meta,
    /// Balancers that could not be set up, and why.
    pub not_run: BTreeMap<Mode, String>,
    /// Phases that failed, and why.
    pub errors: BTreeMap<String, String>,
    pub rounds: Option<Rounds>,
    pub failover: Option<Vec<Failover>>,
    pub steering: Option<Vec<Steering>>,
    /// `mtlb_steer` alone, by BPF_PROG_TEST_RUN.
    #[serde(default)]
    pub micro: Option<Vec<MicroRaw>>,
    pub held: Option<Vec<HeldLevel>>,
    pub profile: Option<Profile>,
    /// Replica stop under load (`docker stop`), mtlb and HAProxy.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// The stop phase as measured before with another mtlb binary, kept
    /// when a new measurement replaces `stop` (before and after a change).
    #[serde(default)]
    pub stop_earlier: Option<Stop>,
    /// The previous full run's mtlb/direct ratios, when it was made the
    /// same way (see `Meta::same_method`).
    pub previous: Option<Previous>,
    /// Why a target was missed, written by a human after the run (then
    /// `cargo xtask bench --report-only`).
    pub reasons: BTreeMap<TargetKey, String>,
    /// The per-round and per-repetition rows the summaries come from.
    /// None for a run whose rows were not kept (the committed run's were
    /// published only as the summaries).
    pub raw: Option<Raw>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub phases: Vec<String>,
    /// Wall time of the whole run.
    pub secs: f64,
    /// None: not recorded with the committed run.
    pub date: Option<String>,
    pub commit: String,
    /// Whether mtlb's own sources differed from the commit.
    pub dirty: bool,
    /// None: not recorded with the committed run.
    pub mtlb_sha256: Option<String>,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub kernel: String,
    /// The backends' cgroup given to mtlb, relative to the cgroup2 mount;
    /// None when mtlb was run without `replica_cgroup`.
    pub replica_cgroup: Option<String>,
    pub rounds: usize,
    pub rate_secs: f64,
    pub bulk_secs: f64,
    pub client_threads: usize,
    pub bulk_streams: usize,
    /// Sequential connects per latency measurement.
    pub latency_connects: usize,
    /// A rate run is repeated when processes outside the bench used more
    /// than this share of the machine (%).
    pub foreign_max_pct: f64,
    /// Repetitions of each steering measurement.
    pub steering_reps: usize,
    /// None: not recorded with the committed run.
    pub nofile_limit: Option<u64>,
    pub haproxy: String,
    pub nginx: String,
    /// None: not recorded with the committed run.
    pub ipvsadm: Option<String>,
    pub bpftool: String,
    pub perf: String,
    pub other_mtlb_programs_at_start: Vec<String>,
}

impl Meta {
    /// Whether two runs measured the same way, so that their ratios can
    /// be compared: the replicas' cgroup is named after the bench's pid,
    /// so only whether one was given counts.
    pub fn same_method(&self, o: &Meta) -> bool {
        self.rounds == o.rounds
            && self.rate_secs == o.rate_secs
            && self.bulk_secs == o.bulk_secs
            && self.client_threads == o.client_threads
            && self.bulk_streams == o.bulk_streams
            && self.replica_cgroup.is_some() == o.replica_cgroup.is_some()
            && self.mtlb_sha256.is_some()
            && self.mtlb_sha256 == o.mtlb_sha256
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    Mtlb,
    Haproxy,
    Nginx,
    Ipvs,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Mtlb,
        Mode::Haproxy,
        Mode::Nginx,
        Mode::Ipvs,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct (2 backends, round-robin)",
            Mode::Mtlb => "mtlb",
            Mode::Haproxy => "HAProxy",
            Mode::Nginx => "nginx stream",
            Mode::Ipvs => "IPVS",
        }
    }
}

/// Median, min and max of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Median, quartiles, min and max of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// None for a series without a finite value.
    pub fn range(&self) -> Option<Range> {
        (self.n > 0).then_some(Range {
            median: self.median,
            min: self.min,
            max: self.max,
        })
    }

    pub fn spread(&self) -> Option<Spread> {
        (self.n > 0).then_some(Spread {
            median: self.median,
            q1: self.q1,
            q3: self.q3,
            min: self.min,
            max: self.max,
        })
    }
}

/// The interleaved rounds, summarised over the rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rounds {
    /// The modes that ran, in `Mode::ALL` order.
    pub modes: Vec<ModeRounds>,
    /// Each mode's per-round figure over the same round's direct one.
    pub ratios: Vec<Ratios>,
    /// mtlb's programs during the mtlb rate runs, by program name.
    pub mtlb_programs: BTreeMap<String, ProgramRounds>,
    /// Runs of all mtlb programs during an mtlb round's bulk streams.
    pub bulk_bpf_runs: Option<Range>,
    /// mtlb BPF time / HAProxy process CPU per connection, by round.
    pub bpf_vs_haproxy: Option<Spread>,
    /// IPVS: whole-machine CPU per connection minus direct's, by round (µs).
    pub ipvs_kernel_us: Option<Range>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeRounds {
    pub mode: Mode,
    /// New connections per second.
    pub rate: Range,
    pub bulk_mbs: Range,
    pub connect_p50_us: Option<Range>,
    pub connect_p99_us: Option<Range>,
    /// Busy CPU of the machine less processes outside the bench, per
    /// connection (µs).
    pub machine_us: Range,
    /// The balancer process(es), per connection (µs); HAProxy and nginx.
    pub balancer_us: Option<Range>,
    /// All mtlb programs' bpf_stats run time per connection (µs).
    pub bpf_us: Option<Range>,
    /// The mtlb agent process per connection (µs).
    pub agent_us: Option<Range>,
    /// CPU of processes outside the bench, % of the machine.
    pub foreign_pct: Range,
    /// Rate runs repeated because of outside load, all rounds.
    pub repeated: u64,
    /// Failed requests, all rounds.
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratios {
    pub mode: Mode,
    pub rate: Spread,
    pub bulk: Spread,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramRounds {
    /// None when the program did not run.
    pub ns_per_run: Option<Range>,
    pub runs_per_conn: Range,
    pub ns_per_conn: Range,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    pub mode: Mode,
    pub requests: u64,
    pub failed: u64,
}

/// BPF cost at one replica count, over the repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steering {
    pub replicas: u16,
    /// The agent's `algorithm`.
    #[serde(default = "leastconn")]
    pub algorithm: String,
    /// mtlb_steer.
    pub sk_lookup: Option<ProgramCost>,
    /// mtlb_sockops.
    pub sock_ops: Option<ProgramCost>,
    pub bpf_ns_per_conn: Range,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramCost {
    pub ns_per_run: Option<Range>,
    pub runs_per_conn: Range,
}

/// One level of the held-connections phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldLevel {
    /// The level aimed at.
    pub level: u64,
    /// Connections open at this level.
    pub held: u64,
    /// How the connections added for this level were opened (None at 0).
    pub opened: Option<Opened>,
    /// Sum of `mtlb_backend_active_connections`; None: /metrics failed.
    pub mtlb_active_connections: Option<f64>,
    pub agent_idle_cpu_pct: f64,
    pub metrics_ms_p50: Option<f64>,
    pub metrics_ms_p99: Option<f64>,
    pub control_ms_p50: Option<f64>,
    pub control_ms_p99: Option<f64>,
    pub agent_rss_mib: Option<f64>,
    /// Memlock of the maps pinned in the agent's pin directory.
    pub maps_memlock_mib: f64,
    /// Entries of the countable maps (hash, LRU, sockmap, sk_storage).
    pub map_entries: BTreeMap<String, MapEntries>,
    pub agent_profile: Option<AgentProfile>,
    /// Sample counts behind the percentiles. None: not recorded with the
    /// committed run.
    pub samples: Option<HeldSamples>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Opened {
    pub added: u64,
    pub failed: u64,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldSamples {
    pub metrics_samples: usize,
    pub metrics_failed: usize,
    pub control_samples: usize,
    pub control_failed: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapEntries {
    pub kind: String,
    pub max_entries: u64,
    pub count: Count,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Count {
    Entries(u64),
    /// Why the map could not be counted.
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentProfile {
    /// What the agent was doing ("idle", "scraped by …").
    pub during: String,
    pub perf: Result<PerfPid, String>,
}

/// `perf record -p <agent>`: top symbols by self time and including
/// callees.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerfPid {
    pub secs: u32,
    pub children: Vec<Sym>,
    #[serde(rename = "self")]
    pub self_: Vec<Sym>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sym {
    pub pct: f64,
    pub symbol: String,
}

/// Where the time goes under the mtlb rate load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `bpftool prog profile` per program: its output, or why not.
    pub bpftool_prog_profile: BTreeMap<String, Result<String, String>>,
    pub perf: Result<Perf, String>,
}

/// Whole-machine `perf record -e cpu-clock -a -g`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Perf {
    pub secs: u32,
    /// Sampling frequency (Hz).
    pub hz: u32,
    pub top: Vec<Sym>,
    pub bpf_prog_pct_total: f64,
    pub bpf_prog_rows: Vec<Sym>,
    /// None: not recorded with the committed run (which published only the
    /// per-connection figure derived from it).
    pub bpf_machinery_pct_total: Option<f64>,
    pub bpf_machinery_rows: Vec<Sym>,
    /// Connections per second during the recording.
    pub conns_per_sec: f64,
    /// Per connection: the programs' own code and all the BPF machinery
    /// (µs), from the sample shares, `cpus` and `conns_per_sec`.
    pub bpf_prog_us: f64,
    pub bpf_machinery_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Previous {
    pub rate: f64,
    pub bulk: f64,
    pub date: Option<String>,
}

/// The stop phase: official MTProxy replicas in Docker under a paced load
/// of complete clients, `docker stop mtproxy2` and `docker start` again,
/// through mtlb and through HAProxy configured as the seed configures it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stop {
    /// When and with what it was measured (the phase can be merged into a
    /// record of other phases measured at another time).
    pub date: Option<String>,
    pub commit: String,
    pub dirty: bool,
    pub mtlb_sha256: Option<String>,
    /// Wall time of the phase.
    pub secs: f64,
    /// New clients per second aimed at.
    pub rate: f64,
    /// A client's timeout (s).
    pub client_timeout_secs: f64,
    /// Load before `docker stop`, with the replica stopped, and after
    /// `docker start` (s).
    pub before_secs: f64,
    pub stopped_secs: f64,
    pub after_secs: f64,
    /// The official server's command line in the containers.
    pub replica_command: String,
    /// mtlb's config file and HAProxy's.
    pub mtlb_config: String,
    pub haproxy_config: String,
    /// One per stop, in the order run (the modes interleaved).
    pub reps: Vec<StopRep>,
}

/// One `docker stop` / `docker start` under load through one balancer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRep {
    pub mode: Mode,
    pub rep: usize,
    /// Clients started, and the rate they were started at (/s).
    pub clients: u64,
    pub achieved_rate: f64,
    /// Seconds after the load started: `docker stop mtproxy2` issued and
    /// returned, `docker start mtproxy2` issued and returned, the load's
    /// last client started.
    pub stop_at: f64,
    /// When the kernel generated SIGTERM for mtproxy2's server (tracefs),
    /// if it was seen.
    #[serde(default)]
    pub signal_at: Option<f64>,
    pub stopped_at: f64,
    pub start_at: f64,
    pub started_at: f64,
    pub end_at: f64,
    /// When the balancer showed mtp2 DOWN after the stop and UP after the
    /// start (seconds after the load started; polled every 50 ms).
    pub down_seen_at: Option<f64>,
    pub up_seen_at: Option<f64>,
    /// The clients by start time: before the stop, while `docker stop`
    /// ran, while mtproxy2 was stopped, from `docker start` on.
    pub windows: Vec<StopWindow>,
    /// Served clients' time to the answer (ms).
    pub served_ms_p50: Option<f64>,
    pub served_ms_p99: Option<f64>,
    pub served_ms_max: Option<f64>,
    /// Failed clients' time to the failure (ms).
    pub failed_ms_p50: Option<f64>,
    pub failed_ms_max: Option<f64>,
    /// Busy CPU of the whole machine during the stop's load, and of the
    /// processes outside the bench's namespace (% of the machine).
    pub machine_busy_pct: f64,
    pub foreign_pct: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopWindow {
    pub name: String,
    pub clients: u64,
    /// Failed clients by outcome (`refused`, `reset`, `closed`,
    /// `timed_out`, `garbage`, `other`).
    pub failed: BTreeMap<crate::mtclient::Outcome, u64>,
}

impl StopWindow {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The targets the report judges, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TargetKey {
    #[serde(rename = "rate_ratio")]
    RateRatio,
    #[serde(rename = "bulk_ratio")]
    BulkRatio,
    #[serde(rename = "rerun")]
    Rerun,
    #[serde(rename = "bpf_per_conn")]
    BpfPerConn,
    #[serde(rename = "runs_per_conn")]
    RunsPerConn,
    #[serde(rename = "cpu_over_direct")]
    CpuOverDirect,
    #[serde(rename = "bpf_vs_haproxy")]
    BpfVsHaproxy,
    #[serde(rename = "sk_lookup_2")]
    SkLookup2,
    #[serde(rename = "sk_lookup_64")]
    SkLookup64,
    #[serde(rename = "sk_lookup_64_random")]
    SkLookup64Random,
    #[serde(rename = "held_100k")]
    Held100k,
    #[serde(rename = "idle_cpu_100k")]
    IdleCpu100k,
    #[serde(rename = "metrics_p99_100k")]
    MetricsP99100k,
    #[serde(rename = "control_p99_100k")]
    ControlP99100k,
    #[serde(rename = "rss_100k")]
    Rss100k,
    #[serde(rename = "held_1m")]
    Held1m,
    #[serde(rename = "idle_cpu_1m")]
    IdleCpu1m,
    #[serde(rename = "metrics_p99_1m")]
    MetricsP991m,
    #[serde(rename = "control_p99_1m")]
    ControlP991m,
    #[serde(rename = "rss_1m")]
    Rss1m,
    #[serde(rename = "failover_mtlb")]
    FailoverMtlb,
}

/// The measured rows behind the summaries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub rounds: Vec<RoundRow>,
    pub steering: Vec<SteeringRaw>,
}

/// One mode in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundRow {
    pub round: usize,
    pub position: usize,
    pub mode: Mode,
    /// Rate runs made (more than 1: repeated for outside load).
    pub attempts: usize,
    pub conns: u64,
    pub failed: u64,
    pub secs: f64,
    pub rate: f64,
    pub machine_cpu_s: f64,
    pub foreign_cpu_s: f64,
    pub balancer_cpu_s: Option<f64>,
    pub agent_cpu_s: Option<f64>,
    pub bpf: BTreeMap<String, ProgDelta>,
    pub bulk_bpf: BTreeMap<String, ProgDelta>,
    pub bulk_mbs: f64,
    pub connect_p50_us: Option<f64>,
    pub connect_p99_us: Option<f64>,
}

/// What one program did between two samples of bpf_stats.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgDelta {
    pub runs: u64,
    pub ns: u64,
}

/// The micro phase at one replica count.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroRaw {
    pub replicas: u16,
    /// The agent's `algorithm`.
    #[serde(default = "leastconn")]
    pub algorithm: String,
    /// Program runs per test run.
    pub repeat: u32,
    /// The kernel's mean time per run, one figure per test run.
    pub ns_per_run: Vec<f64>,
    /// The same for a lookup of another port (the program leaves at its
    /// port test): the test run's own cost, the floor.
    pub floor_ns_per_run: Vec<f64>,
    /// How many different listeners the last runs of the test runs chose.
    pub listeners_chosen: usize,
    /// Whether the kernel's run-time stats were on: then every figure
    /// includes their two clock reads per run (records made before the
    /// phase turned them off have them on).
    #[serde(default = "yes")]
    pub run_stats: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringRaw {
    pub replicas: u16,
    #[serde(default = "leastconn")]
    pub algorithm: String,
    pub reps: Vec<SteeringRep>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringRep {
    pub conns: u64,
    pub failed: u64,
    pub rate: f64,
    pub bpf: BTreeMap<String, ProgDelta>,
}

/// Micro rows recorded before the phase turned the run-time stats off had
/// them on.
fn yes() -> bool {
    true
}

/// Rows recorded before the bench had `algorithm` name none: read as the
/// agent's default.
fn leastconn() -> String {
    "leastconn".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_a_replica_cgroup_of_other_names_are_the_same_method() {
        let run: Run = serde_json::from_str(include_str!("../last-run.json")).unwrap();
        let mut a = run.meta.clone();
        a.mtlb_sha256 = Some("x".into());
        let mut b = a.clone();
        b.replica_cgroup = Some("mtlb-bench-1/replicas".into());
        assert!(a.same_method(&b));
        b.replica_cgroup = None;
        assert!(!a.same_method(&b));
        let mut c = a.clone();
        c.mtlb_sha256 = Some("y".into());
        assert!(!a.same_method(&c));
        c.rounds += 1;
        c.mtlb_sha256 = a.mtlb_sha256.clone();
        assert!(!a.same_method(&c));
        // Without the binary's hash (records of runs before it was kept)
        // nothing is the same method: the binaries cannot be compared.
        let mut old = run.meta.clone();
        old.mtlb_sha256 = None;
        assert!(!old.same_method(&old));
    }
}
