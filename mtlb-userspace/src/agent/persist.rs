//! Operator choices (admin state, weight) kept across agent restarts, by
//! replica name, in `<state_dir>/state-<netns inode>.json`; with them, the
//! service addresses an agent put on `lo` and the table their routes went
//! in, so that a start with another `[announce]` can take the old ones
//! back.

use super::slot::Slot;
use crate::checks::health::Admin;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "invalid state file {path} (operator choices: drain, maint, weights); fix or remove it"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid state file {path}: {what}; fix or remove it")]
    Invalid { path: PathBuf, what: String },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub backends: BTreeMap<String, SavedBackend>,
    /// The host drained by the operator (`mtlb host drain`): its service
    /// addresses are not announced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_drained: bool,
    /// What the last start made mtlb's: written at start, read by the
    /// next one (and by `mtlb remove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<SavedAnnounce>,
}

/// The service addresses mtlb holds on `lo` and the announce table of
/// their routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAnnounce {
    pub table: u32,
    pub vips: Vec<std::net::IpAddr>,
}

/// `vips` and, after them, those `record` holds besides: every address
/// mtlb has on `lo`, which taking mtlb off (`mtlb remove`) removes.
pub fn held_vips(
    vips: &[std::net::IpAddr],
    record: Option<&SavedAnnounce>,
) -> Vec<std::net::IpAddr> {
    let mut all = vips.to_vec();
    for v in record.into_iter().flat_map(|r| &r.vips) {
        if !all.contains(v) {
            all.push(*v);
        }
    }
    all
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackend {
    #[serde(serialize_with = "admin_out", deserialize_with = "admin_in")]
    pub admin: Admin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Admin states are kept as "READY", "DRAIN", "MAINT".
fn admin_out<S: Serializer>(a: &Admin, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.as_str())
}

fn admin_in<'de, D: Deserializer<'de>>(d: D) -> Result<Admin, D::Error> {
    let s = String::deserialize(d)?;
    Admin::parse(&s.to_ascii_lowercase())
        .ok_or_else(|| serde::de::Error::custom(format!("unknown admin state {s:?}")))
}

pub fn state_file(dir: &Path, netns_ino: u64) -> PathBuf {
    dir.join(format!("state-{netns_ino}.json"))
}

impl Saved {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, PersistError> {
        match std::fs::read_to_string(path) {
            Ok(t) => {
                let s: Self = serde_json::from_str(&t).map_err(|source| PersistError::Parse {
                    path: path.to_owned(),
                    source,
                })?;
                s.check().map_err(|what| PersistError::Invalid {
                    path: path.to_owned(),
                    what,
                })?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(PersistError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The announce record drives route deletions and address removals:
    /// a hand-edited one must not name a table the kernel routes by or an
    /// address such as ::1.
    fn check(&self) -> Result<(), String> {
        let Some(a) = &self.announce else {
            return Ok(());
        };
        if crate::config::RESERVED_TABLES.contains(&a.table) {
            return Err(format!(
                "announce.table {} is a table the kernel routes by",
                a.table
            ));
        }
        match a
            .vips
            .iter()
            .find_map(|v| crate::config::not_a_vip(v).map(|w| (v, w)))
        {
            Some((v, why)) => Err(format!("announce.vips {v} {why}")),
            None => Ok(()),
        }
    }

    /// Writes durably: a temp file, fsynced, renamed over the old one, and
    /// the directory fsynced, so a crash leaves the old file or the new
    /// one, never a torn one.
    pub fn store(&self, path: &Path) -> Result<(), PersistError> {
        use std::io::Write as _;
        let write = |source| PersistError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(write)?;
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(self).expect("the state serializes");
        let mut f = std::fs::File::create(&tmp).map_err(write)?;
        f.write_all(&text).map_err(write)?;
        f.sync_all().map_err(write)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(write)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)
    }

    /// Sets `name`'s admin state; an entry that says nothing beyond the
    /// defaults (READY, no weight) is not kept.
    pub fn set_admin(&mut self, name: &str, admin: Admin) {
        self.backends.entry(name.to_string()).or_default().admin = admin;
        self.prune(name);
    }

    pub fn set_weight(&mut self, name: &str, weight: u32) {
        self.backends.entry(name.to_string()).or_default().weight = Some(weight);
    }

    fn prune(&mut self, name: &str) {
        if self
            .backends
            .get(name)
            .is_some_and(|b| b.admin == Admin::Ready && b.weight.is_none())
        {
            self.backends.remove(name);
        }
    }

    /// The choices the slots hold (not READY, or a weight set): what the
    /// saved state says of the replicas configured.
    #[cfg(test)]
    pub fn from_slots(slots: &[Slot]) -> Self {
        Self {
            backends: slots
                .iter()
                .filter(|s| s.admin() != Admin::Ready || s.weight_override().is_some())
                .map(|s| {
                    (
                        s.name.clone(),
                        SavedBackend {
                            admin: s.admin(),
                            weight: s.weight_override(),
                        },
                    )
                })
                .collect(),
            host_drained: false,
            announce: None,
        }
    }

    pub(super) fn apply(&self, s: &mut Slot) {
        if let Some(b) = self.backends.get(&s.name) {
            s.admin = b.admin;
            s.weight_override = b.weight;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trips_and_keeps_its_format() {
        let mut s = Saved::default();
        s.backends.insert(
            "mtp2".into(),
            SavedBackend {
                admin: Admin::Maint,
                weight: Some(3),
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let p = state_file(dir.path(), 7);
        s.store(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"admin\": \"MAINT\""), "{text}");
        assert!(!text.contains("announce"), "{text}");
        assert_eq!(Saved::load(&p).unwrap(), s);
        s.announce = Some(SavedAnnounce {
            table: 4242,
            vips: vec![
                "192.0.2.80".parse().unwrap(),
                "2001:db8::80".parse().unwrap(),
            ],
        });
        s.store(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"192.0.2.80\""), "{text}");
        assert_eq!(Saved::load(&p).unwrap(), s);
        // A record that would delete the main table's routes or ::1.
        for bad in [
            "{\"backends\":{},\"announce\":{\"table\":254,\"vips\":[\"192.0.2.80\"]}}",
            "{\"backends\":{},\"announce\":{\"table\":4242,\"vips\":[\"::1\"]}}",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(
                matches!(Saved::load(&p), Err(PersistError::Invalid { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Saved::load(&dir.path().join("none.json")).unwrap(),
            Saved::default()
        );
        std::fs::write(&p, "{\"backends\":{\"mtp1\":{\"admin\":\"NOPE\"}}}").unwrap();
        assert!(matches!(Saved::load(&p), Err(PersistError::Parse { .. })));
        // Truncated.
        std::fs::write(&p, "{\"backends\":{\"mtp1\":{\"adm").unwrap();
        assert!(matches!(Saved::load(&p), Err(PersistError::Parse { .. })));
    }
}
