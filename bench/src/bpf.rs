//! Readings of mtlb's BPF programs and maps through bpftool: run time and
//! run counts (kernel.bpf_stats_enabled=1), map memory and entries, and
//! `bpftool prog profile`.
//!
//! Only this agent's objects are read: the programs behind the links it
//! pinned and the maps it pinned, in its pin directory (one per network
//! namespace), so another agent elsewhere on the host does not count.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

fn bpftool_json(args: &[&str]) -> Result<Value, String> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "bpftool {}: {e}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v.get("error") {
        return Err(format!("bpftool {}: {e}", args.join(" ")));
    }
    Ok(v)
}

/// The ids of mtlb's programs, found through its pinned links.
#[derive(Debug, Clone, Default)]
pub struct Progs {
    /// program name -> id
    pub ids: BTreeMap<String, u64>,
}

impl Progs {
    pub fn find(pin_dir: &Path) -> Progs {
        let mut ids = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(pin_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !name.starts_with("link_") {
                    continue;
                }
                let p = e.path();
                let Ok(l) = bpftool_json(&["link", "show", "pinned", &p.to_string_lossy()]) else {
                    continue;
                };
                let Some(id) = l["prog_id"].as_u64() else {
                    continue;
                };
                if let Ok(pr) = bpftool_json(&["prog", "show", "id", &id.to_string()])
                    && let Some(n) = pr["name"].as_str()
                {
                    ids.insert(n.to_string(), id);
                }
            }
        }
        Progs { ids }
    }

    /// (run_cnt, run_time_ns) of each program now.
    pub fn sample(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out = BTreeMap::new();
        if self.ids.is_empty() {
            return out;
        }
        let Ok(Value::Array(all)) = bpftool_json(&["prog", "show"]) else {
            return out;
        };
        for (name, id) in &self.ids {
            if let Some(p) = all.iter().find(|p| p["id"].as_u64() == Some(*id)) {
                out.insert(
                    name.clone(),
                    (
                        p["run_cnt"].as_u64().unwrap_or(0),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                    ),
                );
            }
        }
        out
    }
}

pub use crate::model::ProgDelta;

pub fn delta(
    a: &BTreeMap<String, (u64, u64)>,
    b: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, ProgDelta> {
    b.iter()
        .map(|(k, &(c1, t1))| {
            let (c0, t0) = a.get(k).copied().unwrap_or((0, 0));
            (
                k.clone(),
                ProgDelta {
                    runs: c1.saturating_sub(c0),
                    ns: t1.saturating_sub(t0),
                },
            )
        })
        .collect()
}

/// One of mtlb's maps.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub name: String,
    pub id: u64,
    pub kind: String,
    pub max_entries: u64,
    pub memlock: u64,
}

/// mtlb's maps: every pinned object in the pin directory that is not a
/// link.
pub fn maps(pin_dir: &Path) -> Vec<MapInfo> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(pin_dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
        })
        .collect();
    paths.sort();
    for p in paths {
        let Ok(m) = bpftool_json(&["map", "show", "pinned", &p.to_string_lossy()]) else {
            continue;
        };
        out.push(MapInfo {
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            id: m["id"].as_u64().unwrap_or(0),
            kind: m["type"].as_str().unwrap_or("?").to_string(),
            max_entries: m["max_entries"].as_u64().unwrap_or(0),
            memlock: m["bytes_memlock"].as_u64().unwrap_or(0),
        });
    }
    out
}

/// Map types whose entries are counted per held connection.
pub fn countable(kind: &str) -> bool {
    matches!(kind, "hash" | "lru_hash" | "sockmap" | "sk_storage")
}

/// Number of entries of a map, from `bpftool -j map dump` (a sockmap
/// lists every slot, empty ones with an error value: those are not
/// counted), or why not.
pub fn entries(id: u64, kind: &str) -> Result<u64, String> {
    if kind == "sk_storage" {
        // bpf(2) offers no MAP_GET_NEXT_KEY for socket storage: bpftool
        // lists nothing, whatever the map holds.
        return Err("sk_storage: not walkable".into());
    }
    let v = bpftool_json(&["map", "dump", "id", &id.to_string()])?;
    let Value::Array(a) = v else {
        return Err("bpftool map dump: not a list".into());
    };
    Ok(a.iter()
        .filter(|e| e["value"].get("error").is_none())
        .count() as u64)
}

/// `bpftool prog profile id ID duration SECS cycles instructions`: its
/// output, or its error.
pub fn profile(id: u64, secs: u32) -> Result<String, String> {
    let out = Command::new("bpftool")
        .args([
            "prog",
            "profile",
            "id",
            &id.to_string(),
            "duration",
            &secs.to_string(),
            "cycles",
            "instructions",
        ])
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.is_empty() {
        Ok(text)
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; "),
            if pmu_cycles() {
                ""
            } else {
                " (and this machine has no hardware cycle counter: `perf stat -e cycles` says <not supported>, which the profile needs)"
            }
        ))
    }
}

/// Whether the CPU's cycle counter can be read (`perf stat -e cycles`).
pub fn pmu_cycles() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles", "--", "true"])
        .output()
        .map(|o| {
            let e = String::from_utf8_lossy(&o.stderr);
            o.status.success() && !e.contains("not supported") && !e.contains("not counted")
        })
        .unwrap_or(false)
}
