//! Configuration: TOML file, command-line overrides, validation.
//!
//! With no file, the defaults are those of the deployment mtlb replaces
//! (HAProxy in front of two MTProxy containers): two replicas on
//! 127.0.0.1:10000 and :10001, balanced port 443, leastconn, stats on 8404.

use mtlb_common::MAX_REPLICAS;
use serde::Deserialize;
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

/// Default config path.
/// The weights a replica may have (`weights` in the configuration,
/// `mtlb backend NAME weight N`): load is compared as connections / weight
/// in the kernel, with no division by zero and weights that fit its word.
pub const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=256;

pub const DEFAULT_PATH: &str = "/etc/mtlb/mtlb.toml";
/// Default bpffs mount: the one place systems mount it.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// mtlb's runtime directory: the default `control_dir`, the namespace
/// locks, and a cgroup2 mount when the system has none.
pub const RUN_DIR: &str = "/run/mtlb";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(key: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: short(&value.to_string()),
        reason: reason.to_string(),
    }
}

/// How much of a value an error quotes: a value can be megabytes (a long
/// array on one line), and its start is enough to find it.
const QUOTED: usize = 64;

/// `s`, cut to [`QUOTED`] characters and "…".
fn short(s: &str) -> String {
    match s.char_indices().nth(QUOTED) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// `m` with every run between backquotes or double quotes cut as by
/// [`short`]: serde's messages quote the offending value or key.
fn short_quotes(m: &str) -> String {
    let mut out = String::new();
    // The quote that opened the run we are in, and the run's length.
    let mut open: Option<(char, usize)> = None;
    let mut escaped = false;
    for c in m.chars() {
        match &mut open {
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some((c, 0));
                }
            }
            // A string quoted with escapes (`{:?}`) holds \" inside.
            Some((q, n)) if c == *q && !escaped => {
                if *n > QUOTED {
                    out.push('…');
                }
                out.push(c);
                open = None;
            }
            Some((_, n)) => {
                *n += 1;
                if *n <= QUOTED {
                    out.push(c);
                }
                escaped = c == '\\' && !escaped;
            }
        }
    }
    if open.is_some_and(|(_, n)| n > QUOTED) {
        out.push('…');
    }
    out
}

/// What toml found wrong with `text`, on one line: its message, the key,
/// and where, quoting only the start of the line. (toml's own Display
/// quotes the whole line: megabytes for a long array written on one.)
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    // Without the input, toml says the message and the key path only.
    let mut bare = e.clone();
    bare.set_input(None);
    let mut m = short_quotes(&bare.to_string().trim_end().replace('\n', ", "));
    if let Some(before) = e.span().and_then(|s| text.get(..s.start)) {
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = text[line_start..].lines().next().unwrap_or_default();
        m += &format!(
            " (line {}, column {}: {})",
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
            short(line.trim())
        );
    }
    m
}

/// The balancing algorithm, by HAProxy's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Least (handshakes + established) / weight over every replica: exact,
    /// and what the original deployment used. Its pick reads one cache line
    /// per replica on every new connection.
    Leastconn,
    /// HAProxy's `balance random(2)`: the less loaded of two replicas drawn
    /// at random. A pick of constant cost at any replica count; loads stay
    /// within a few connections of each other, not exactly even.
    #[serde(alias = "random(2)")]
    Random,
}

impl Algorithm {
    /// The name HAProxy gives it, as logged and exported.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Leastconn => "leastconn",
            Algorithm::Random => "random(2)",
        }
    }

    /// SETTINGS.draws: 0 scans every slot, 2 draws two.
    pub fn draws(self) -> u8 {
        match self {
            Algorithm::Leastconn => 0,
            Algorithm::Random => 2,
        }
    }
}

/// What a health check verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// TCP connect and close.
    Tcp,
    /// An MTProxy handshake with the configured secret (see `checks`).
    Mtproxy,
    /// Only the replica's HTTP stats endpoint (`total_ready_targets` > 0).
    Stats,
    /// No checks: a registered replica is UP.
    None,
}

/// `[check]`: health checks, with HAProxy's knobs and meanings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    /// "tcp" (default), "mtproxy", "stats" or "none".
    pub kind: CheckKind,
    /// Interval between checks while steady, ms. Default 2000 (HAProxy's).
    pub inter_ms: u64,
    /// Interval while a state change is under way ("DOWN 1/2"), ms.
    /// Default 1000.
    pub fastinter_ms: u64,
    /// Interval while DOWN, ms. Default 2000.
    pub downinter_ms: u64,
    /// Consecutive successes to go UP. Default 2.
    pub rise: u32,
    /// Consecutive failures to go DOWN. Default 3.
    pub fall: u32,
    /// Timeout of one check, ms. Default 2000.
    pub timeout_ms: u64,
    /// A replica whose accept queue stays non-empty without draining this
    /// long, or is full, is DOWN ("accept queue stalled"), ms. Default 2000.
    pub stall_ms: u64,
    /// Replica `i`'s MTProxy HTTP stats port is `stats_base_port + i`; when
    /// set, `total_ready_targets` must be > 0 too (with kind "stats", it is
    /// the only check). Default: unset.
    pub stats_base_port: Option<u16>,
    /// Ramp a replica's weight up over this long after it comes UP, ms.
    /// Default 0 (off).
    pub slowstart_ms: u64,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            inter_ms: 2000,
            fastinter_ms: 1000,
            downinter_ms: 2000,
            rise: 2,
            fall: 3,
            timeout_ms: 2000,
            stall_ms: 2000,
            stats_base_port: None,
            slowstart_ms: 0,
        }
    }
}

/// `[announce]`: the service addresses this host announces over BGP
/// (through the host's BIRD) while it can serve.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnounceConfig {
    /// Service addresses (VIPs), IPv4 and IPv6. Empty (default): nothing
    /// is announced, the feature is off.
    pub vips: Vec<IpAddr>,
    /// Replicas that must be UP and READY (not drained, not in
    /// maintenance) for the host to be announced. Default 1.
    pub min_up: u16,
    /// The host must have been able to serve this long before it is
    /// announced, ms. Default 3000.
    pub rise_ms: u64,
    /// ... and unable this long before it is withdrawn, ms; a drain by
    /// the operator withdraws at once. Default 1000.
    pub fall_ms: u64,
    /// Kernel routing table the announced VIPs' host routes go into (BIRD
    /// learns it). Default 4242.
    pub table: u32,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        Self {
            vips: Vec::new(),
            min_up: 1,
            rise_ms: 3000,
            fall_ms: 1000,
            table: 4242,
        }
    }
}

/// Routing tables the kernel keeps for itself: unspec, default, main,
/// local (linux/rtnetlink.h `rt_class_t`).
pub const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// Why `v` cannot be a service address (one mtlb puts on and takes off
/// `lo`), if it cannot.
pub fn not_a_vip(v: &std::net::IpAddr) -> Option<&'static str> {
    let c = v.to_canonical();
    (c.is_unspecified() || c.is_multicast() || c.is_loopback())
        .then_some("must be a unicast service address (not loopback)")
}

/// `mtlb.toml`. Every key is optional; see README "Configuration".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Balanced TCP port. Default 443.
    pub port: u16,
    /// Local addresses whose balanced port is steered. Empty (default):
    /// every local address, IPv4 and IPv6.
    pub addresses: Vec<IpAddr>,
    /// Number of replicas. Default 2. Replica `i` (0-based) is named
    /// `mtp{i+1}` and listens on `replica_address:base_port+i`.
    pub replicas: u16,
    /// First replica port. Default 10000.
    pub base_port: u16,
    /// Address the replicas listen on. Default 127.0.0.1. A replica
    /// listening on the wildcard address (0.0.0.0 or ::) on its port counts
    /// too.
    pub replica_address: IpAddr,
    /// uids whose sockets may become replicas (the uid that binds the
    /// replica port, or owns an already listening socket). Default [0]:
    /// root only, so an unprivileged local user who listens on a replica
    /// port first gets no slot and no client. At most 64.
    pub replica_uids: Vec<u32>,
    /// Let any local user's listener on a replica port become the replica
    /// (the behaviour before `replica_uids`). Default false; logged as a
    /// warning when set.
    pub any_replica_owner: bool,
    /// Per-replica weights, in replica order; missing entries are 1.
    /// Each 1..=256. Default: all 1.
    pub weights: Vec<u32>,
    /// Balancing algorithm: "leastconn" (default) or "random" (also spelt
    /// "random(2)": two random choices).
    pub algorithm: Algorithm,
    /// MTProxy secret the replicas use (for links and checks). Default
    /// "dd00000000000000000000000000000000".
    pub secret: String,
    /// Stats/metrics HTTP address. Default 127.0.0.1; any other address
    /// exposes the stats beyond this host and must be chosen explicitly.
    pub stats_address: IpAddr,
    /// Stats/metrics HTTP port. Default 8404.
    pub stats_port: u16,
    /// How often the stats page samples each replica's active connections
    /// for its sparkline, in milliseconds; the last 60 samples are kept
    /// (10 minutes at the default 10000).
    pub stats_sample_ms: u64,
    /// bpffs mount point under which pins live. Default /sys/fs/bpf
    /// (mounted there if nothing is).
    pub bpffs: PathBuf,
    /// Keep the programs attached and maps pinned when the agent exits
    /// (SIGTERM, SIGINT), so steering and counts go on and the next agent
    /// takes them over: a restart (`systemctl restart mtlb`) never refuses
    /// a connection. Default true. `mtlb remove` takes mtlb off for good;
    /// false makes every exit do that.
    pub keep_pins: bool,
    /// The replicas' cgroup (v2), relative to the cgroup2 mount (or a full
    /// path under it). Connection accounting and the listen hook run for
    /// sockets created in it (or below it) only, so no other socket of the
    /// host pays for them, and only listeners created there become
    /// replicas. For Docker, a parent of the containers' cgroups (e.g.
    /// `system.slice` with the systemd cgroup driver); for systemd units,
    /// a slice they run in. Default "": the root, every process.
    pub replica_cgroup: PathBuf,
    /// How often the agent looks for replica listeners it has not seen
    /// register (e.g. started before it), in milliseconds. Default 500.
    pub scan_interval_ms: u64,
    /// A handshake (SYN received, not yet established) stops counting
    /// toward its replica's load after this many milliseconds. The kernel
    /// gives no event for a handshake that never completes (SYN flood,
    /// client gone, full accept queue); this bounds how long it weighs.
    /// Default 3000.
    pub handshake_timeout_ms: u64,
    /// After a stop signal (SIGTERM, SIGINT, SIGQUIT) to a process
    /// holding a replica's listener, the replica takes no new connection;
    /// if the same listener is still there this many milliseconds later
    /// (the process ignored the signal), the mark is lifted and the replica
    /// is checked as usual. Default 10000 (`docker stop` sends SIGKILL
    /// after 10 s).
    pub stop_grace_ms: u64,
    /// Where operator choices (drain/maint/ready, weights) are kept across
    /// agent restarts. Default /var/lib/mtlb.
    pub state_dir: PathBuf,
    /// Directory of the control socket `<netns inode>.sock`. Default
    /// /run/mtlb.
    pub control_dir: PathBuf,
    /// Health checks.
    pub check: CheckConfig,
    /// BGP announcement of the service addresses.
    pub announce: AnnounceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            port: 443,
            addresses: Vec::new(),
            replicas: 2,
            base_port: 10000,
            replica_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            replica_uids: vec![0],
            any_replica_owner: false,
            weights: Vec::new(),
            algorithm: Algorithm::Leastconn,
            secret: "dd00000000000000000000000000000000".into(),
            stats_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            stats_port: 8404,
            stats_sample_ms: 10_000,
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            keep_pins: true,
            replica_cgroup: PathBuf::new(),
            scan_interval_ms: 500,
            handshake_timeout_ms: 3000,
            stop_grace_ms: 10_000,
            state_dir: PathBuf::from("/var/lib/mtlb"),
            control_dir: PathBuf::from(RUN_DIR),
            check: CheckConfig::default(),
            announce: AnnounceConfig::default(),
        }
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Balanced TCP port [config: port, default 443].
    #[arg(long)]
    pub port: Option<u16>,
    /// Number of replicas [config: replicas, default 2].
    #[arg(long)]
    pub replicas: Option<u16>,
    /// First replica port [config: base_port, default 10000].
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Address replicas listen on [config: replica_address, default 127.0.0.1].
    #[arg(long)]
    pub replica_address: Option<IpAddr>,
    /// uid allowed to run replicas; repeat for several [config:
    /// replica_uids, default 0 (root)].
    #[arg(long = "replica-uid")]
    pub replica_uids: Vec<u32>,
    /// Any local user's listener on a replica port may become the replica
    /// [config: any_replica_owner].
    #[arg(long)]
    pub any_replica_owner: bool,
    /// Balanced local address; repeat for several [config: addresses, default: all].
    #[arg(long = "address")]
    pub addresses: Vec<IpAddr>,
    /// bpffs mount point [config: bpffs, default /sys/fs/bpf].
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Keep programs attached and maps pinned on exit: true or false
    /// [config: keep_pins, default true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub keep_pins: Option<bool>,
    /// The replicas' cgroup, relative to the cgroup2 mount: accounting runs
    /// there only, and binds to replica ports from outside it are refused
    /// [config: replica_cgroup, default: the root, every process].
    #[arg(long)]
    pub replica_cgroup: Option<PathBuf>,
    /// Milliseconds after which an incomplete handshake stops counting
    /// [config: handshake_timeout_ms, default 3000].
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Directory for state kept across restarts [config: state_dir,
    /// default /var/lib/mtlb].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Directory of the control socket [config: control_dir, default
    /// /run/mtlb].
    #[arg(long)]
    pub control_dir: Option<PathBuf>,
    /// Stats/metrics HTTP port [config: stats_port, default 8404].
    #[arg(long)]
    pub stats_port: Option<u16>,
    /// Stats/metrics HTTP address [config: stats_address, default
    /// 127.0.0.1].
    #[arg(long)]
    pub stats_address: Option<IpAddr>,
}

impl Config {
    /// Reads `path`. A missing file is not an error only when `path` is the
    /// default path (the operator did not ask for a file).
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })
    }

    pub fn apply(&mut self, o: &Overrides) {
        // Each flag given replaces the key of the same name.
        macro_rules! given {
            ($($key:ident),*) => {$(
                if let Some(v) = &o.$key {
                    self.$key = v.clone();
                }
            )*};
        }
        given!(
            port,
            replicas,
            base_port,
            replica_address,
            bpffs,
            replica_cgroup,
            handshake_timeout_ms,
            state_dir,
            control_dir,
            stats_port,
            stats_address
        );
        if !o.addresses.is_empty() {
            self.addresses = o.addresses.clone();
        }
        if !o.replica_uids.is_empty() {
            self.replica_uids = o.replica_uids.clone();
        }
        if o.any_replica_owner {
            self.any_replica_owner = true;
        }
        if let Some(k) = o.keep_pins {
            self.keep_pins = k;
        }
    }

    /// Checks every value; the error names the key and the bad value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(invalid("port", self.port, "must be 1..=65535"));
        }
        if self.replicas == 0 || self.replicas as u32 > MAX_REPLICAS {
            return Err(invalid(
                "replicas",
                self.replicas,
                format!("must be 1..={MAX_REPLICAS}"),
            ));
        }
        if self.base_port == 0 {
            return Err(invalid("base_port", self.base_port, "must be 1..=65535"));
        }
        let last = self.base_port as u32 + self.replicas as u32 - 1;
        if last > 65535 {
            return Err(invalid(
                "base_port",
                self.base_port,
                format!("{} replicas from this port run past 65535", self.replicas),
            ));
        }
        if (self.base_port as u32..=last).contains(&(self.port as u32)) {
            return Err(invalid(
                "port",
                self.port,
                format!(
                    "the balanced port lies inside the replica ports {}..={last}",
                    self.base_port
                ),
            ));
        }
        if self.replica_address.is_unspecified() || self.replica_address.is_multicast() {
            return Err(invalid(
                "replica_address",
                self.replica_address,
                "must be a unicast address the replicas listen on",
            ));
        }
        if self.addresses.len() > 64 {
            return Err(invalid(
                "addresses",
                self.addresses.len(),
                "at most 64 addresses",
            ));
        }
        if let Some(a) = self
            .addresses
            .iter()
            .find(|a| a.is_unspecified() || a.is_multicast())
        {
            return Err(invalid(
                "addresses",
                a,
                "list concrete local addresses, or leave it empty for all",
            ));
        }
        // An IPv4 client can be handed to an IPv6 listener (one without
        // IPV6_V6ONLY takes it, IPv4-mapped: the kernel allows that
        // assignment), so IPv4 balanced addresses with an IPv6
        // replica_address work. An IPv6 client never reaches an IPv4
        // listener: IPv6 balanced addresses with an IPv4 replica_address
        // refuse every client of theirs unless the replicas happen to
        // listen dual-stack on [::], which the config does not say. An
        // empty list means whatever addresses the host has, not a choice
        // of IPv6. IPv4-mapped addresses are IPv4 to the programs (see
        // `reconcile::addr16`).
        if self.replica_address.to_canonical().is_ipv4()
            && let Some(a) = self.addresses.iter().find(|a| a.to_canonical().is_ipv6())
        {
            return Err(invalid(
                "addresses",
                a,
                format!(
                    "IPv6 clients can only be handed to replicas listening on IPv6, and \
                     replica_address {} is IPv4; for replicas listening dual-stack on [::], \
                     set replica_address = \"::1\" (they then take IPv4 clients too)",
                    self.replica_address
                ),
            ));
        }
        if self.replica_uids.len() > mtlb_common::MAX_ALLOWED_UIDS as usize {
            return Err(invalid(
                "replica_uids",
                self.replica_uids.len(),
                format!("at most {} uids", mtlb_common::MAX_ALLOWED_UIDS),
            ));
        }
        if self.replica_uids.is_empty() && !self.any_replica_owner {
            return Err(invalid(
                "replica_uids",
                "[]",
                "no one could run a replica; list the replicas' uids, or set any_replica_owner = true",
            ));
        }
        if self.weights.len() > self.replicas as usize {
            return Err(invalid(
                "weights",
                format!("{:?}", self.weights),
                format!(
                    "{} weights for {} replicas",
                    self.weights.len(),
                    self.replicas
                ),
            ));
        }
        if let Some(w) = self.weights.iter().find(|w| !WEIGHTS.contains(*w)) {
            return Err(invalid("weights", w, "each weight must be 1..=256"));
        }
        if self
            .replica_cgroup
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(
                "replica_cgroup",
                self.replica_cgroup.display(),
                "must name a cgroup under the cgroup2 mount, without ..",
            ));
        }
        validate_secret(&self.secret)?;
        if self.stats_port == 0 {
            return Err(invalid("stats_port", self.stats_port, "must be 1..=65535"));
        }
        if self.stats_port == self.port {
            return Err(invalid(
                "stats_port",
                self.stats_port,
                "is the balanced port",
            ));
        }
        if (self.base_port as u32..=last).contains(&(self.stats_port as u32)) {
            return Err(invalid(
                "stats_port",
                self.stats_port,
                format!("lies inside the replica ports {}..={last}", self.base_port),
            ));
        }
        if !self.bpffs.is_absolute() {
            return Err(invalid(
                "bpffs",
                self.bpffs.display(),
                "must be an absolute path",
            ));
        }
        if !(100..=600_000).contains(&self.stop_grace_ms) {
            return Err(invalid(
                "stop_grace_ms",
                self.stop_grace_ms,
                "must be 100..=600000",
            ));
        }
        if !(10..=60_000).contains(&self.scan_interval_ms) {
            return Err(invalid(
                "scan_interval_ms",
                self.scan_interval_ms,
                "must be 10..=60000",
            ));
        }
        for (key, v, lo) in [
            ("check.inter_ms", self.check.inter_ms, 10),
            ("check.fastinter_ms", self.check.fastinter_ms, 10),
            ("check.downinter_ms", self.check.downinter_ms, 10),
            ("check.timeout_ms", self.check.timeout_ms, 10),
            ("check.stall_ms", self.check.stall_ms, 100),
        ] {
            if !(lo..=3_600_000).contains(&v) {
                return Err(invalid(key, v, format!("must be {lo}..=3600000")));
            }
        }
        if !(1..=100).contains(&self.check.rise) {
            return Err(invalid("check.rise", self.check.rise, "must be 1..=100"));
        }
        if !(1..=100).contains(&self.check.fall) {
            return Err(invalid("check.fall", self.check.fall, "must be 1..=100"));
        }
        if self.check.slowstart_ms > 3_600_000 {
            return Err(invalid(
                "check.slowstart_ms",
                self.check.slowstart_ms,
                "must be 0..=3600000",
            ));
        }
        if self.check.kind == CheckKind::Stats && self.check.stats_base_port.is_none() {
            return Err(invalid(
                "check.kind",
                "stats",
                "needs check.stats_base_port",
            ));
        }
        if let Some(b) = self.check.stats_base_port
            && (b == 0 || b as u32 + self.replicas as u32 - 1 > 65535)
        {
            return Err(invalid(
                "check.stats_base_port",
                b,
                format!(
                    "{} stats ports from it must fit in 1..=65535",
                    self.replicas
                ),
            ));
        }
        // Rejected whatever the check kind: a config whose ports collide
        // does not say what the operator meant, and a later change of kind
        // would find it.
        if let Some(b) = self.check.stats_base_port {
            for i in 0..self.replicas {
                let p = b + i;
                let what = if p == self.port {
                    "the balanced port (`port`)".to_string()
                } else if p == self.stats_port {
                    "the agent's own stats port (`stats_port`)".to_string()
                } else if let Some(j) = p.checked_sub(self.base_port).filter(|j| *j < self.replicas)
                {
                    format!("{}'s port (`base_port` + {j})", replica_name(j.into()))
                } else {
                    continue;
                };
                return Err(invalid(
                    "check.stats_base_port",
                    b,
                    format!("{}'s stats port {p} is {what}", replica_name(i.into())),
                ));
            }
        }
        for (key, p) in [
            ("state_dir", &self.state_dir),
            ("control_dir", &self.control_dir),
        ] {
            if !p.is_absolute() {
                return Err(invalid(key, p.display(), "must be an absolute path"));
            }
        }
        if !(100..=60_000).contains(&self.stats_sample_ms) {
            return Err(invalid(
                "stats_sample_ms",
                self.stats_sample_ms,
                "must be 100..=60000",
            ));
        }
        if !(100..=600_000).contains(&self.handshake_timeout_ms) {
            return Err(invalid(
                "handshake_timeout_ms",
                self.handshake_timeout_ms,
                "must be 100..=600000",
            ));
        }
        self.validate_announce()
    }

    fn validate_announce(&self) -> Result<(), ConfigError> {
        let a = &self.announce;
        if a.vips.len() > 16 {
            return Err(invalid(
                "announce.vips",
                a.vips.len(),
                "at most 16 addresses",
            ));
        }
        for (i, v) in a.vips.iter().enumerate() {
            if let Some(why) = not_a_vip(v) {
                return Err(invalid("announce.vips", v, why));
            }
            let c = v.to_canonical();
            if c != *v {
                return Err(invalid(
                    "announce.vips",
                    v,
                    format!("write the IPv4 address as {c}"),
                ));
            }
            if a.vips[..i].contains(v) {
                return Err(invalid("announce.vips", v, "listed twice"));
            }
            if !self.addresses.is_empty() && !self.addresses.contains(v) {
                return Err(invalid(
                    "announce.vips",
                    v,
                    "is not in `addresses`: connections to it would not be steered; \
                     add it there, or leave `addresses` empty (every local address)",
                ));
            }
            if v.is_ipv6() && self.replica_address.to_canonical().is_ipv4() {
                return Err(invalid(
                    "announce.vips",
                    v,
                    format!(
                        "IPv6 clients can only be handed to replicas listening on IPv6, and \
                         replica_address {} is IPv4; for replicas listening dual-stack on \
                         [::], set replica_address = \"::1\"",
                        self.replica_address
                    ),
                ));
            }
        }
        if a.min_up == 0 || a.min_up > self.replicas {
            return Err(invalid(
                "announce.min_up",
                a.min_up,
                format!(
                    "must be 1..={} (replicas): the host could never be announced",
                    self.replicas
                ),
            ));
        }
        for (key, v) in [
            ("announce.rise_ms", a.rise_ms),
            ("announce.fall_ms", a.fall_ms),
        ] {
            if v > 600_000 {
                return Err(invalid(key, v, "must be 0..=600000"));
            }
        }
        if RESERVED_TABLES.contains(&a.table) {
            return Err(invalid(
                "announce.table",
                a.table,
                "is a table the kernel routes by (0, 253 default, 254 main, 255 local); \
                 pick one of mtlb's own",
            ));
        }
        Ok(())
    }

    /// What may change on a reload; the rest needs a restart. Returns the
    /// first key that differs and may not.
    pub fn reload_blocker(&self, new: &Config) -> Option<&'static str> {
        if self.base_port != new.base_port {
            return Some("base_port");
        }
        if self.replica_address != new.replica_address {
            return Some("replica_address");
        }
        if self.bpffs != new.bpffs {
            return Some("bpffs");
        }
        if self.replica_cgroup != new.replica_cgroup {
            return Some("replica_cgroup");
        }
        if self.control_dir != new.control_dir {
            return Some("control_dir");
        }
        if self.state_dir != new.state_dir {
            return Some("state_dir");
        }
        if self.stats_address != new.stats_address {
            return Some("stats_address");
        }
        if self.stats_port != new.stats_port {
            return Some("stats_port");
        }
        if self.stats_sample_ms != new.stats_sample_ms {
            return Some("stats_sample_ms");
        }
        // The addresses are made local and the table read at start.
        if self.announce.vips != new.announce.vips {
            return Some("announce.vips");
        }
        if self.announce.table != new.announce.table {
            return Some("announce.table");
        }
        None
    }

    /// The replicas' cgroup directory, given where cgroup2 is mounted.
    pub fn replica_cgroup_in(&self, mount: &Path) -> PathBuf {
        if self.replica_cgroup.starts_with(mount) {
            return self.replica_cgroup.clone();
        }
        let rel = self
            .replica_cgroup
            .strip_prefix("/")
            .unwrap_or(&self.replica_cgroup);
        mount.join(rel)
    }

    /// Whether `uid` may own a replica's listener.
    pub fn owner_allowed(&self, uid: u32) -> bool {
        self.any_replica_owner || self.replica_uids.contains(&uid)
    }

    pub fn weight(&self, slot: usize) -> u32 {
        self.weights.get(slot).copied().unwrap_or(1)
    }

    pub fn replica_port(&self, slot: usize) -> u16 {
        self.base_port + slot as u16
    }
}

/// Replica name as on the original HAProxy stats page.
pub fn replica_name(slot: usize) -> String {
    format!("mtp{}", slot + 1)
}

/// Accepts the three MTProxy secret forms: 32 hex digits (plain), `dd` + 32
/// (padded intermediate), `ee` + 32 + hex-encoded domain (fake TLS).
fn validate_secret(s: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| invalid("secret", s, reason);
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) || !s.len().is_multiple_of(2) {
        return Err(bad("must be an even number of hex digits"));
    }
    match s.len() {
        32 => Ok(()),
        34 if s[..2].eq_ignore_ascii_case("dd") => Ok(()),
        n if n > 34 && s[..2].eq_ignore_ascii_case("ee") => Ok(()),
        _ => Err(bad(
            "expected 32 hex digits, dd + 32 hex digits, or ee + 32 hex digits + hex domain",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(s, Path::new("t.toml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_match_original_deployment() {
        let c = parse("").unwrap();
        assert_eq!(c.port, 443);
        assert_eq!(c.replicas, 2);
        assert_eq!(c.base_port, 10000);
        assert_eq!(c.replica_address.to_string(), "127.0.0.1");
        assert_eq!(c.stats_port, 8404);
        assert_eq!(c.algorithm, Algorithm::Leastconn);
        assert_eq!(c.secret, "dd00000000000000000000000000000000");
        assert_eq!(replica_name(1), "mtp2");
        assert_eq!(c.replica_port(1), 10001);
    }

    #[test]
    fn overrides_win() {
        let mut c = parse("port = 8443\nreplicas = 3").unwrap();
        c.apply(&Overrides {
            port: Some(9443),
            base_port: Some(20000),
            ..Default::default()
        });
        assert_eq!((c.port, c.replicas, c.base_port), (9443, 3, 20000));
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = err("replicas = 0");
        assert!(e.contains("`replicas`") && e.contains(": 0:"), "{e}");
        let e = err("replicas = 65");
        assert!(e.contains("`replicas`") && e.contains("65"), "{e}");
        let e = err("port = 10001");
        assert!(e.contains("`port`") && e.contains("10001"), "{e}");
        let e = err("base_port = 65535\nreplicas = 2");
        assert!(e.contains("`base_port`") && e.contains("65535"), "{e}");
        let e = err("weights = [1, 0]");
        assert!(e.contains("`weights`") && e.contains(": 0:"), "{e}");
        let e = err("weights = [1, 1, 1]");
        assert!(e.contains("`weights`"), "{e}");
        let e = err("secret = \"xyz\"");
        assert!(e.contains("`secret`") && e.contains("xyz"), "{e}");
        let e = err("secret = \"dd0011\"");
        assert!(e.contains("`secret`"), "{e}");
        let e = err("replica_address = \"0.0.0.0\"");
        assert!(
            e.contains("`replica_address`") && e.contains("0.0.0.0"),
            "{e}"
        );
        let e = err("addresses = [\"::\"]");
        assert!(e.contains("`addresses`"), "{e}");
        let e = err("replica_cgroup = \"../escape\"");
        assert!(
            e.contains("`replica_cgroup`") && e.contains("../escape"),
            "{e}"
        );
    }

    #[test]
    fn the_replica_cgroup_is_found_under_the_mount_and_needs_a_restart() {
        let mount = Path::new("/sys/fs/cgroup");
        let mut c = Config::default();
        assert_eq!(c.replica_cgroup_in(mount), mount, "default: the root");
        for given in [
            "system.slice",
            "/system.slice",
            "/sys/fs/cgroup/system.slice",
        ] {
            c.replica_cgroup = PathBuf::from(given);
            assert_eq!(
                c.replica_cgroup_in(mount),
                Path::new("/sys/fs/cgroup/system.slice"),
                "{given}"
            );
        }
        let old = Config::default();
        assert_eq!(old.reload_blocker(&c), Some("replica_cgroup"));
        let cfg = Config::parse("replica_cgroup = \"mtproxy.slice\"", Path::new("x")).unwrap();
        assert_eq!(cfg.replica_cgroup, Path::new("mtproxy.slice"));
    }

    #[test]
    fn announce_section() {
        let c = parse(
            "replica_address = \"::1\"\n[announce]\nvips = [\"192.0.2.80\", \"2001:db8::80\"]\nmin_up = 2",
        )
        .unwrap();
        assert_eq!(c.announce.vips.len(), 2);
        assert_eq!(
            (c.announce.min_up, c.announce.rise_ms, c.announce.fall_ms),
            (2, 3000, 1000)
        );
        assert_eq!(c.announce.table, 4242);
        assert!(
            parse("").unwrap().announce.vips.is_empty(),
            "off by default"
        );
        for (toml, needle) in [
            ("[announce]\nvips = [\"2001:db8::80\"]", "replica_address"),
            ("[announce]\nvips = [\"127.0.0.1\"]", "not loopback"),
            ("[announce]\nvips = [\"0.0.0.0\"]", "unicast"),
            (
                "[announce]\nvips = [\"192.0.2.80\", \"192.0.2.80\"]",
                "listed twice",
            ),
            (
                "[announce]\nvips = [\"::ffff:192.0.2.80\"]",
                "write the IPv4 address as 192.0.2.80",
            ),
            (
                "addresses = [\"192.0.2.1\"]\n[announce]\nvips = [\"192.0.2.80\"]",
                "not in `addresses`",
            ),
            (
                "[announce]\nvips = [\"192.0.2.80\"]\nmin_up = 3",
                "`announce.min_up`: 3",
            ),
            (
                "[announce]\nvips = [\"192.0.2.80\"]\nmin_up = 0",
                "`announce.min_up`: 0",
            ),
            ("[announce]\ntable = 254", "`announce.table`: 254"),
            ("[announce]\nfall_ms = 600001", "`announce.fall_ms`"),
            ("[announce]\nvip = [\"192.0.2.80\"]", "vip"),
        ] {
            let e = err(toml);
            assert!(e.contains(needle), "{toml}: {e}");
        }
        let mut new = c.clone();
        new.announce.min_up = 1;
        new.announce.rise_ms = 0;
        assert_eq!(c.reload_blocker(&new), None, "rise, fall, min_up reload");
        new.announce.vips.pop();
        assert_eq!(c.reload_blocker(&new), Some("announce.vips"));
    }

    #[test]
    fn parse_errors_name_the_key() {
        let e = err("port = 70000");
        assert!(e.contains("port") && e.contains("70000"), "{e}");
        let e = err("replica_adress = \"127.0.0.1\"");
        assert!(e.contains("replica_adress"), "{e}");
        let e = err("replica_address = \"localhost\"");
        assert!(e.contains("replica_address"), "{e}");
        let e = err("algorithm = \"roundrobin\"");
        assert!(e.contains("roundrobin") && e.contains("leastconn"), "{e}");
        assert!(e.contains("random"), "{e}");
        let e = err("algorithm = \"random(3)\"");
        assert!(e.contains("random(3)"), "{e}");
    }

    #[test]
    fn random_by_either_name() {
        for name in ["random", "random(2)"] {
            let c = parse(&format!("algorithm = \"{name}\"")).unwrap();
            assert_eq!(c.algorithm, Algorithm::Random);
            assert_eq!((c.algorithm.name(), c.algorithm.draws()), ("random(2)", 2));
        }
        assert_eq!(Algorithm::Leastconn.draws(), 0);
    }

    #[test]
    fn check_section() {
        let c = parse("[check]\nkind = \"mtproxy\"\nrise = 3\ninter_ms = 500").unwrap();
        assert_eq!(c.check.kind, CheckKind::Mtproxy);
        assert_eq!((c.check.rise, c.check.fall, c.check.inter_ms), (3, 3, 500));
        let e = err("[check]\nfall = 0");
        assert!(e.contains("`check.fall`: 0"), "{e}");
        let e = err("[check]\nkind = \"stats\"");
        assert!(
            e.contains("`check.kind`") && e.contains("stats_base_port"),
            "{e}"
        );
        let e = err("[check]\nknd = \"tcp\"");
        assert!(e.contains("knd"), "{e}");
    }

    #[test]
    fn reload_blockers() {
        let a = Config::default();
        let b = Config {
            replicas: 3,
            port: 8443,
            ..Default::default()
        };
        assert_eq!(a.reload_blocker(&b), None);
        let c = Config {
            base_port: 20000,
            ..Default::default()
        };
        assert_eq!(a.reload_blocker(&c), Some("base_port"));
    }

    #[test]
    fn secrets() {
        for s in [
            "00000000000000000000000000000000",
            "dd00000000000000000000000000000000",
            "ee0000000000000000000000000000000065786d61706c652e636f6d",
        ] {
            validate_secret(s).unwrap();
        }
    }

    #[test]
    fn missing_default_file_is_defaults_but_explicit_is_error() {
        let p = Path::new("/nonexistent/mtlb.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(Config::load(p, true).is_err());
    }

    #[test]
    fn stats_port_must_not_be_a_balanced_or_replica_port() {
        for (text, why) in [
            ("stats_port = 443", "is the balanced port"),
            ("stats_port = 10001", "inside the replica ports"),
            ("port = 8404", "is the balanced port"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("`stats_port`") && e.contains(why), "{text}: {e}");
        }
        assert!(parse("stats_port = 10002").is_ok());
    }

    #[test]
    fn stats_sample_ms_is_bounded_and_needs_a_restart() {
        assert_eq!(parse("").unwrap().stats_sample_ms, 10_000);
        for text in ["stats_sample_ms = 99", "stats_sample_ms = 60001"] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("`stats_sample_ms`"), "{text}: {e}");
        }
        let a = parse("stats_sample_ms = 100").unwrap();
        let b = parse("stats_sample_ms = 200").unwrap();
        assert_eq!(a.reload_blocker(&b), Some("stats_sample_ms"));
    }

    #[test]
    fn replica_owners() {
        let c = parse("").unwrap();
        assert_eq!(c.replica_uids, [0]);
        assert!(c.owner_allowed(0) && !c.owner_allowed(65534));
        let e = parse("replica_uids = []").unwrap_err().to_string();
        assert!(e.contains("`replica_uids`"), "{e}");
        let c = parse("replica_uids = []\nany_replica_owner = true").unwrap();
        assert!(c.owner_allowed(65534));
        let many: Vec<String> = (0..65).map(|u| u.to_string()).collect();
        let e = parse(&format!("replica_uids = [{}]", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 64"), "{e}");
        let mut c = Config::default();
        c.apply(&Overrides {
            replica_uids: vec![995],
            keep_pins: Some(false),
            ..Overrides::default()
        });
        assert_eq!(c.replica_uids, [995]);
        assert!(!c.keep_pins);
    }

    #[test]
    fn replica_stats_ports_collide_with_no_other_port() {
        for (check, why) in [
            (
                "stats_base_port = 442",
                "mtp2's stats port 443 is the balanced port (`port`)",
            ),
            (
                "stats_base_port = 10001",
                "mtp1's stats port 10001 is mtp2's port (`base_port` + 1)",
            ),
            (
                "stats_base_port = 9999",
                "mtp2's stats port 10000 is mtp1's port (`base_port` + 0)",
            ),
            (
                "stats_base_port = 8403",
                "mtp2's stats port 8404 is the agent's own stats port (`stats_port`)",
            ),
            // Whatever the kind, even one that reads no stats port.
            (
                "kind = \"none\"\nstats_base_port = 443",
                "mtp1's stats port 443 is the balanced port",
            ),
        ] {
            let e = err(&format!("[check]\n{check}"));
            assert!(
                e.contains("`check.stats_base_port`") && e.contains(why),
                "{check}: {e}"
            );
        }
        let c = parse("[check]\nkind = \"stats\"\nstats_base_port = 11000").unwrap();
        assert_eq!(c.check.stats_base_port, Some(11000));
        // Beside the ports, not on them.
        parse("replicas = 3\n[check]\nstats_base_port = 10003").unwrap();
        parse("[check]\nstats_base_port = 8405").unwrap();
    }

    #[test]
    fn balanced_ipv6_addresses_need_an_ipv6_replica_address() {
        for (text, addr) in [
            ("addresses = [\"::1\"]", "::1"),
            (
                "addresses = [\"127.0.0.1\", \"2001:db8::1\"]",
                "2001:db8::1",
            ),
        ] {
            let e = err(text);
            assert!(
                e.contains(&format!("`addresses`: {addr}:"))
                    && e.contains("replica_address 127.0.0.1 is IPv4")
                    && e.contains("replica_address = \"::1\""),
                "{text}: {e}"
            );
        }
        for text in [
            // Dual-stack replicas take both.
            "addresses = [\"::1\", \"127.0.0.1\"]\nreplica_address = \"::1\"",
            // IPv4 clients are handed to an IPv6 listener, IPv4-mapped.
            "addresses = [\"127.0.0.1\"]\nreplica_address = \"::1\"",
            // IPv4, written as IPv6.
            "addresses = [\"::ffff:127.0.0.1\"]",
            // Whatever the host has.
            "addresses = []",
            "addresses = []\nreplica_address = \"::1\"",
        ] {
            parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    /// The error for `text`: under 1 KiB, naming `key`.
    fn short_error(text: &str, key: &str) -> String {
        let e = crate::error::report(&parse(text).unwrap_err());
        assert!(e.len() < 1024, "{} bytes: {}…", e.len(), &e[..1024]);
        assert!(e.contains(key), "{e}");
        e
    }

    #[test]
    fn errors_quote_only_the_start_of_a_long_value() {
        let ones = "1, ".repeat(2_000_000);
        let e = short_error(&format!("weights = [{ones}]"), "`weights`");
        assert!(e.contains("2000000 weights for 2 replicas"), "{e}");
        for bad in ["-1", "\"x\"", "1.5"] {
            let e = short_error(&format!("weights = [{ones}{bad}]"), "weights");
            assert!(e.contains("line 1, column 6000012: weights = [1, 1"), "{e}");
        }
        let long = "f".repeat(100_000);
        short_error(&format!("secret = \"{long}\""), "`secret`");
        let e = short_error(&format!("algorithm = \"{long}\""), "algorithm");
        assert!(e.contains("expected one of `leastconn`, `random`"), "{e}");
        let e = short_error(&format!("{long} = 1"), "unknown field");
        assert!(e.contains("expected one of `port`"), "{e}");
        short_error(
            &format!("replica_cgroup = \"../{long}\""),
            "`replica_cgroup`",
        );
        let e = short_error(&format!("port = \"{long}\""), "port");
        assert!(e.contains(&format!("\"{}…\"", "f".repeat(QUOTED))), "{e}");
    }

    #[test]
    fn quoted_runs_are_cut() {
        let long = "a".repeat(100);
        let cut = format!("{}…", "a".repeat(QUOTED));
        assert_eq!(
            short_quotes(&format!("unknown variant `{long}`, expected `x`")),
            format!("unknown variant `{cut}`, expected `x`")
        );
        // An escaped quote does not end a run.
        assert_eq!(
            short_quotes(&format!("string \"\\\"{long}\" and `y`")),
            format!("string \"\\\"{}…\" and `y`", "a".repeat(QUOTED - 2))
        );
        assert_eq!(short_quotes("no quotes"), "no quotes");
    }
}
