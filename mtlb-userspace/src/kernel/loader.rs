//! Loading the kernel programs, attaching them and pinning links and maps.

use super::{
    maps::{self, Maps},
    pins::names,
};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use std::{
    fs::File,
    path::{Path, PathBuf},
};

/// The object built from mtlb-ebpf by build.rs.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mtlb"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("program {name} missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("cannot load program {name} ({what})")]
    Program {
        name: &'static str,
        what: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach {name} to {target}")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin link {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
    #[error("cannot find the tracefs (mount it at /sys/kernel/tracing)")]
    Tracefs(#[source] crate::system::mounts::MountError),
    #[error("{path}: {why}")]
    TraceFormat { path: PathBuf, why: String },
}

/// The bind hooks and their link pins: they mark sockets an allowed owner
/// binds to a replica port.
const BIND_PROGRAMS: [&str; 2] = ["mtlb_bind4", "mtlb_bind6"];
const BIND_LINKS: [&str; 2] = [names::LINK_BIND4, names::LINK_BIND6];

/// The stop-signal watch: tracepoint signal:signal_generate.
const SIGNAL_PROGRAM: &str = "mtlb_signal";
const SIGNAL_EVENT: (&str, &str) = ("signal", "signal_generate");
/// Where mtlb_signal reads the fields of the tracepoint's record (see
/// mtlb-ebpf/src/signal.rs): name, offset, size.
const SIGNAL_FIELDS: [(&str, usize, usize); 3] = [("sig", 8, 4), ("pid", 36, 4), ("result", 44, 4)];

/// A loaded, not yet attached balancer.
pub struct Loaded {
    ebpf: Ebpf,
    pub maps: Maps,
}

/// Attached programs; their links are pinned so that steering outlives the
/// agent when pins are kept.
pub struct Attached {
    links: Vec<(PathBuf, PinnedLink)>,
    /// Links of a previous agent replaced by ours, to be told.
    replaced: Vec<PathBuf>,
}

/// Loads the object and verifies every program with the kernel. Each map
/// is taken from its pin in `pin_dir` when one exists (the state of a
/// previous agent: registrations, counts, socket tags), else created and
/// pinned there. Nothing is attached yet. Check [`pins_compatible`] first.
pub fn load(pin_dir: &Path) -> Result<Loaded, LoadError> {
    let paths: Vec<(&'static str, PathBuf)> = maps::names::ALL
        .iter()
        .map(|n| (*n, pin_dir.join(n)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).map_err(LoadError::Object)?;

    prog::<SkLookup>(&mut ebpf, "mtlb_steer")?
        .load()
        .map_err(|source| LoadError::Program {
            name: "mtlb_steer",
            what: "sk_lookup, Linux 5.9+",
            source,
        })?;
    prog::<SockOps>(&mut ebpf, "mtlb_sockops")?
        .load()
        .map_err(|source| LoadError::Program {
            name: "mtlb_sockops",
            what: "sock_ops",
            source,
        })?;
    prog::<TracePoint>(&mut ebpf, SIGNAL_PROGRAM)?
        .load()
        .map_err(|source| LoadError::Program {
            name: SIGNAL_PROGRAM,
            what: "tracepoint",
            source,
        })?;
    for name in BIND_PROGRAMS {
        prog::<CgroupSockAddr>(&mut ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program {
                name,
                what: "cgroup bind hook",
                source,
            })?;
    }
    let maps = Maps::take(&mut ebpf)?;
    Ok(Loaded { ebpf, maps })
}

/// Whether an earlier agent's pins can be taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compat {
    Compatible,
    /// Why not, for the log.
    Incompatible(String),
}

/// Whether every map pinned in `pin_dir` has the shape this build's maps
/// have (type, key and value size, entries, flags), so a new agent (or a
/// new binary) can take them over. Missing pins count as incompatible,
/// but for maps this build added (`names::ADDED`).
pub fn pins_compatible(pin_dir: &Path) -> Result<Compat, LoadError> {
    // A throw-away load tells the shapes of this build's maps.
    let mut fresh = EbpfLoader::new().load(OBJECT).map_err(LoadError::Object)?;
    for name in maps::names::ALL {
        let Some(ours) = fresh.take_map(name) else {
            return Ok(Compat::Incompatible(format!(
                "map {name} is not in this build"
            )));
        };
        let ours = maps::data(name, ours)?.info();
        let path = pin_dir.join(name);
        // A map this build added is created beside the rest.
        if maps::names::ADDED.contains(name) && !path.exists() {
            continue;
        }
        let theirs = aya::maps::MapData::from_pin(path).and_then(|m| m.info());
        let (ours, theirs) = match (ours, theirs) {
            (Ok(a), Ok(b)) => (a, b),
            (_, Err(e)) => {
                return Ok(Compat::Incompatible(format!("pinned map {name}: {e}")));
            }
            (Err(e), _) => return Ok(Compat::Incompatible(format!("map {name}: {e}"))),
        };
        let shape = |i: &aya::maps::MapInfo| {
            (
                i.map_type().ok(),
                i.key_size(),
                i.value_size(),
                i.max_entries(),
                i.map_flags(),
            )
        };
        if shape(&ours) != shape(&theirs) {
            return Ok(Compat::Incompatible(format!(
                "map {name} differs: pinned {:?}, this build {:?}",
                shape(&theirs),
                shape(&ours)
            )));
        }
    }
    Ok(Compat::Compatible)
}

/// Whether the tracepoint format `text` has each (name, offset, size) of
/// `fields`; else which one differs.
fn check_format(text: &str, fields: &[(&str, usize, usize)]) -> Result<(), String> {
    for (name, offset, size) in fields {
        // "\tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;"
        let found = text.lines().find_map(|l| {
            let mut parts = l.trim().split(';').map(str::trim);
            let decl = parts.next()?.strip_prefix("field:")?;
            if decl.rsplit([' ', '*']).next()? != *name {
                return None;
            }
            let mut off = None;
            let mut sz = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    off = v.parse::<usize>().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    sz = v.parse::<usize>().ok();
                }
            }
            Some((off, sz))
        });
        match found {
            Some((Some(o), Some(s))) if o == *offset && s == *size => {}
            Some((o, s)) => {
                return Err(format!(
                    "field {name} at offset {o:?} size {s:?}, mtlb reads offset {offset} size {size}"
                ));
            }
            None => return Err(format!("no field {name}")),
        }
    }
    Ok(())
}

fn prog<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::Missing { name })
}

impl Loaded {
    /// Attaches the accounting and registration program (sock_ops) to the
    /// replicas' cgroup `replicas`, and the bind hooks to the cgroup2 root
    /// `root` (nobody anywhere may bind a replica port unless allowed).
    /// Steering is attached separately, last, once replicas already
    /// running have been adopted.
    pub fn attach_accounting(
        &mut self,
        root: &Path,
        replicas: &Path,
        pin_dir: &Path,
        out: &mut Attached,
    ) -> Result<(), LoadError> {
        let open = |path: &Path| {
            File::open(path).map_err(|source| LoadError::Open {
                path: path.to_owned(),
                source,
            })
        };
        let (root_cg, cgroup) = (open(root)?, replicas);
        let cg = open(cgroup)?;
        let p = prog::<SockOps>(&mut self.ebpf, "mtlb_sockops")?;
        let id = p
            // With bpf_link (Linux 5.7+) every link on a cgroup runs, like
            // BPF_F_ALLOW_MULTI; link_create itself rejects that flag.
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| LoadError::Attach {
                name: "mtlb_sockops",
                target: format!("cgroup {}", cgroup.display()),
                source,
            })?;
        let link = p.take_link(id).map_err(|source| LoadError::Attach {
            name: "mtlb_sockops",
            target: "link".into(),
            source,
        })?;
        let fd = FdLink::try_from(link).map_err(|e| LoadError::Attach {
            name: "mtlb_sockops",
            target: format!("a bpf_link ({e})"),
            source: aya::programs::ProgramError::AlreadyAttached,
        })?;
        out.pin(fd, pin_dir.join(names::LINK_SOCK_OPS))?;
        // The bind hooks, before any listener can register, so none is
        // missed; on the root: they run only on bind(), and must refuse
        // every other process's bind to a replica port.
        for (name, pin) in BIND_PROGRAMS.into_iter().zip(BIND_LINKS) {
            let p = prog::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let err = |source| LoadError::Attach {
                name,
                target: format!("cgroup {}", root.display()),
                source,
            };
            let id = p.attach(&root_cg, CgroupAttachMode::Single).map_err(err)?;
            let link = p.take_link(id).map_err(err)?;
            let fd = FdLink::try_from(link).map_err(|e| LoadError::Attach {
                name,
                target: format!("a bpf_link ({e})"),
                source: aya::programs::ProgramError::AlreadyAttached,
            })?;
            out.pin(fd, pin_dir.join(pin))?;
        }
        Ok(())
    }

    /// Attaches the stop-signal watch (a tracepoint, for the whole
    /// machine; it acts only on the pids the agent lists in OWNER_PIDS).
    /// Needs the tracefs, mounted here when missing, and the record layout
    /// the program reads, checked against the kernel's format file.
    pub fn attach_signal(&mut self, pin_dir: &Path, out: &mut Attached) -> Result<(), LoadError> {
        let tracefs = crate::system::mounts::ensure_tracefs().map_err(LoadError::Tracefs)?;
        let format = tracefs
            .join("events")
            .join(SIGNAL_EVENT.0)
            .join(SIGNAL_EVENT.1)
            .join("format");
        let text = std::fs::read_to_string(&format).map_err(|source| LoadError::Open {
            path: format.clone(),
            source,
        })?;
        check_format(&text, &SIGNAL_FIELDS).map_err(|why| LoadError::TraceFormat {
            path: format.clone(),
            why,
        })?;
        let p = prog::<TracePoint>(&mut self.ebpf, SIGNAL_PROGRAM)?;
        let err = |source| LoadError::Attach {
            name: SIGNAL_PROGRAM,
            target: format!("tracepoint {}:{}", SIGNAL_EVENT.0, SIGNAL_EVENT.1),
            source,
        };
        let id = p.attach(SIGNAL_EVENT.0, SIGNAL_EVENT.1).map_err(err)?;
        let link = p.take_link(id).map_err(err)?;
        // A perf-event bpf_link (Linux 5.15+): pinned like the others, so
        // the watch outlives the agent with the rest.
        let fd = FdLink::try_from(link).map_err(|e| LoadError::Attach {
            name: SIGNAL_PROGRAM,
            target: format!("a bpf_link ({e})"),
            source: aya::programs::ProgramError::AlreadyAttached,
        })?;
        out.pin(fd, pin_dir.join(names::LINK_SIGNAL))
    }

    /// Attaches the sk_lookup program to this thread's network namespace.
    pub fn attach_steering(&mut self, pin_dir: &Path, out: &mut Attached) -> Result<(), LoadError> {
        let path = PathBuf::from("/proc/thread-self/ns/net");
        let ns = File::open(&path).map_err(|source| LoadError::Open { path, source })?;
        let p = prog::<SkLookup>(&mut self.ebpf, "mtlb_steer")?;
        let err = |source| LoadError::Attach {
            name: "mtlb_steer",
            target: "this network namespace".into(),
            source,
        };
        let id = p.attach(ns).map_err(err)?;
        let link = p.take_link(id).map_err(err)?;
        out.pin(link.into(), pin_dir.join(names::LINK_SK_LOOKUP))
    }
}

impl Attached {
    pub fn new() -> Self {
        Self {
            links: Vec::new(),
            replaced: Vec::new(),
        }
    }

    /// Pins `link` at `path`. A link pinned there before (a previous
    /// agent's, still attached) is unpinned first, which detaches it: the
    /// new one is attached already, so steering never stops.
    fn pin(&mut self, link: FdLink, path: PathBuf) -> Result<(), LoadError> {
        match std::fs::remove_file(&path) {
            Ok(()) => self.replaced.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::Open { path, source }),
        }
        let pinned = link.pin(&path).map_err(|source| LoadError::PinLink {
            path: path.clone(),
            source,
        })?;
        self.links.push((path, pinned));
        Ok(())
    }

    /// The pins of a previous agent's links replaced so far.
    pub fn take_replaced(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.replaced)
    }

    /// Detaches everything: unpins each link and closes it. (Maps are
    /// unpinned by the caller with the directory.) Returns the links that
    /// could not be unpinned, with why.
    pub fn detach(self) -> Vec<(PathBuf, String)> {
        let mut failed = Vec::new();
        for (path, link) in self.links {
            match link.unpin() {
                Ok(fd) => drop(fd),
                Err(e) => failed.push((path, e.to_string())),
            }
        }
        failed
    }

    /// Leaves the links pinned: the programs stay attached after exit.
    pub fn keep(self) {
        drop(self.links);
    }
}

impl Default for Attached {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: signal_generate
ID: 261
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int code;\toffset:16;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:36;\tsize:4;\tsigned:1;
\tfield:int group;\toffset:40;\tsize:4;\tsigned:1;
\tfield:int result;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn the_signal_record_layout_is_checked() {
        assert_eq!(check_format(FORMAT, &SIGNAL_FIELDS), Ok(()));
        let moved = FORMAT.replace("offset:36", "offset:40");
        let e = check_format(&moved, &SIGNAL_FIELDS).unwrap_err();
        assert!(e.contains("field pid at offset Some(40)"), "{e}");
        let gone = FORMAT.replace("int result;", "int outcome;");
        assert_eq!(
            check_format(&gone, &SIGNAL_FIELDS),
            Err("no field result".into())
        );
        // common_pid is not pid.
        let only_common = FORMAT.replace("pid_t pid;", "pid_t tid;");
        assert_eq!(
            check_format(&only_common, &SIGNAL_FIELDS),
            Err("no field pid".into())
        );
    }
}
