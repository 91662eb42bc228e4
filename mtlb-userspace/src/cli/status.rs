//! `mtlb status`: the replicas' table, read from the pinned maps, so it
//! works while the agent runs and after it has died; then who may bind the
//! replica ports and where sock_ops runs, as the kernel holds it.

use super::agent_args::AgentArgs;
use anyhow::Context as _;
use mtlb::{
    config::Config,
    control::{self, Request},
    kernel::{
        dataplane::{Dataplane, ReadOnly},
        pins::names,
        sys,
    },
    stats::{snapshot, table},
    system::{mounts, vip},
};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

/// A cgroup by id, with its path under the cgroup2 mount when found.
#[derive(Debug, Serialize)]
struct Cgroup {
    id: u64,
    path: Option<String>,
}

impl Cgroup {
    fn of(id: u64) -> Self {
        let path = mounts::cgroup2_mount()
            .and_then(|m| mounts::cgroup_path(&m, id))
            .map(|p| p.display().to_string());
        Self { id, path }
    }
}

impl std::fmt::Display for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{p} (id {})", self.id),
            None => write!(f, "id {}", self.id),
        }
    }
}

/// What the bind hooks enforce and where accounting runs.
#[derive(Debug, Serialize)]
struct Owners {
    /// `None`: any uid (`any_replica_owner`).
    uids: Option<Vec<u32>>,
    /// `None`: any cgroup.
    replica_cgroup: Option<Cgroup>,
    /// Where the sock_ops link is attached; `None` when it cannot be read.
    sock_ops_cgroup: Option<Cgroup>,
}

impl Owners {
    fn read(maps: &ReadOnly, dir: &Path) -> anyhow::Result<Self> {
        let uids = (maps.settings()?.require_owner != 0)
            .then(|| maps.allowed_uids())
            .transpose()?;
        let cg = maps.replica_cgroup()?;
        Ok(Self {
            uids,
            replica_cgroup: (cg != 0).then(|| Cgroup::of(cg)),
            sock_ops_cgroup: sys::pinned_cgroup_link_id(&dir.join(names::LINK_SOCK_OPS))
                .ok()
                .map(Cgroup::of),
        })
    }
}

impl std::fmt::Display for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "replica ports: binds by ")?;
        match &self.uids {
            Some(u) => write!(f, "uids {u:?}")?,
            None => write!(f, "any uid")?,
        }
        match &self.replica_cgroup {
            Some(c) => write!(f, " in cgroup {c}")?,
            None => write!(f, " in any cgroup")?,
        }
        match &self.sock_ops_cgroup {
            Some(c) => write!(f, "; sock_ops on cgroup {c}"),
            None => write!(f, "; sock_ops link unreadable"),
        }
    }
}

#[derive(Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    snapshot: &'a snapshot::Snapshot,
    owners: &'a Owners,
    #[serde(skip_serializing_if = "Option::is_none")]
    announce: Option<&'a Announce>,
}

/// The host's service addresses: those announced, as the kernel's
/// announce table holds them, and the state in words: the agent's (with
/// why) when it answers.
#[derive(Debug, Serialize)]
struct Announce {
    vips: Vec<std::net::IpAddr>,
    announced: Vec<std::net::IpAddr>,
    state: String,
}

/// How long `mtlb status` waits for the agent's word.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `None` without `[announce] vips`.
fn announcement(cfg: &Config, control: &Path) -> anyhow::Result<Option<Announce>> {
    let a = &cfg.announce;
    if a.vips.is_empty() {
        return Ok(None);
    }
    let routes = vip::announced(a.table).context("reading the announce table")?;
    let announced = vip::among(&a.vips, &routes);
    let state = match control::request(control, &Request::Host { drain: None }, TIMEOUT) {
        Ok(r) => r.message,
        Err(control::ControlError::Refused(_)) => {
            "the running agent announces nothing (started without [announce] vips: restart it)"
                .into()
        }
        Err(_) if announced.is_empty() => "withdrawn (the agent does not answer)".into(),
        Err(_) => "announced (the agent does not answer: the routes stay as it left them)".into(),
    };
    Ok(Some(Announce {
        vips: a.vips.clone(),
        announced,
        state,
    }))
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let cfg = a.agent.config()?;
    let at = a.agent.locate()?;
    let dir = at.pin_dir;
    let maps = Dataplane::open_read_only(&dir)?;
    let s = snapshot::collect(&maps, &dir, &snapshot::bytes(&maps)?)?;
    let owners = Owners::read(&maps, &dir)?;
    let announce = announcement(&cfg, &at.control_socket)?;
    if a.json {
        let j = Json {
            snapshot: &s,
            owners: &owners,
            announce: announce.as_ref(),
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", table::render(&s));
        println!("{owners}");
        if let Some(a) = announce {
            println!("announce: {}", a.state);
        }
    }
    Ok(())
}
