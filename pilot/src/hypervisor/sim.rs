//! `sim`: a node simulated in a directory, for the demo, tests and evaluation.
//!
//! `<dir>/node.json` holds the node (memory, dom0 balloon, guests, latencies);
//! every read-modify-write holds an exclusive flock on `<dir>/node.lock`, and
//! writes are atomic, so several pilots on one node are safe. Balloon latency
//! is computed from timestamps: no background process. Saving a guest to a
//! checkpoint and restoring it take a configurable time per GB of its
//! memory and carry its identity (`boot_id`) and its disk writes (`files`,
//! written by `sim guest-write`, as a user would in a real guest); a guest
//! is ready `boot_ms` after it was created; CPU shares are recorded on the
//! guest. Nothing runs. Not a VM runner.

use super::{Dom0Memory, Domain, HvError, Hypervisor};
use crate::checkpoint::{CheckpointReader, CheckpointWriter, CkError};
use crate::files::{lock_exclusive, write_atomic, FileLock, LockError};
use protocol::pilot::{CpuControl, CpuShare, VmLaunch};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file a sim checkpoint holds.
const SIM_STATE: &str = "sim-state";

/// File name of the node inside the sim directory.
pub const NODE_FILE: &str = "node.json";
/// Lock file inside the sim directory.
pub const LOCK_FILE: &str = "node.lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated node, as stored in `node.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimNode {
    pub cpus: u32,
    /// Physical memory; also dom0's maximum.
    pub memory_mb: u64,
    pub dom0: SimDom0,
    #[serde(default)]
    pub latency: SimLatency,
    /// The balloon never shrinks dom0 below this (models a stuck balloon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_floor_mb: Option<u64>,
    /// A fault: every CPU share change fails with this reason (`sim
    /// refuse-set-cpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_set_cpu: Option<String>,
    #[serde(default)]
    pub domains: Vec<SimDomain>,
}

/// dom0's balloon. `current_mb` is what dom0 held at `target_set_ms` (or
/// later, when last materialized); it moves linearly to its goal over
/// `latency.balloon_ms` from `from_mb`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimDom0 {
    pub current_mb: u64,
    pub target_mb: u64,
    pub max_mb: u64,
    /// dom0's memory when the target was last set.
    #[serde(default)]
    pub from_mb: u64,
    /// Epoch ms when the target was last set.
    #[serde(default)]
    pub target_set_ms: u64,
}

/// Latencies of the simulated operations, in ms (all 0 by default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimLatency {
    #[serde(default)]
    pub balloon_ms: u64,
    #[serde(default)]
    pub create_ms: u64,
    #[serde(default)]
    pub destroy_ms: u64,
    /// Saving a guest to a checkpoint, per GB of its memory.
    #[serde(default)]
    pub save_ms_per_gb: u64,
    /// Restoring a guest from a checkpoint, per GB of its memory.
    #[serde(default)]
    pub restore_ms_per_gb: u64,
    /// A created guest is ready (booted) this long after its creation.
    #[serde(default)]
    pub boot_ms: u64,
}

impl SimLatency {
    fn per_gb(ms_per_gb: u64, memory_mb: u64) -> Duration {
        Duration::from_millis(ms_per_gb.saturating_mul(memory_mb) / 1024)
    }
}

/// What a sim checkpoint records of its guest (the first line of its file;
/// a filler of 1 KiB per MB of memory follows, so sizes and checksums mean
/// something).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SimSaved {
    name: String,
    memory_mb: u64,
    cpus: u32,
    image: String,
    boot_id: String,
    created_ms: u64,
    #[serde(default)]
    files: Vec<String>,
}

/// One guest of the simulated node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimDomain {
    pub name: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub state: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub created_ms: u64,
    /// The addresses the coordinator gave the VM (recorded, not simulated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<protocol::pilot::Nic>,
    /// Random at create, carried through save and restore: a resumed guest
    /// has its boot id, a rebooted one would not.
    #[serde(default)]
    pub boot_id: String,
    /// Files written on the guest's disk (its overlay), carried through
    /// save and restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Its CPU share, as last applied (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuShare>,
    /// The urgency of its launch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub urgency: u8,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

fn random_boot_id() -> String {
    let v = protocol::SlotId::generate();
    let w = protocol::SlotId::generate();
    format!("{}{}", &v.as_str()[3..], &w.as_str()[3..])
}

impl SimNode {
    /// A fresh node whose dom0 holds `dom0_mb` of `memory_mb` (at most all of it).
    pub fn new(memory_mb: u64, cpus: u32, dom0_mb: Option<u64>) -> Self {
        let dom0 = dom0_mb.unwrap_or(memory_mb).min(memory_mb);
        Self {
            cpus,
            memory_mb,
            dom0: SimDom0 {
                current_mb: dom0,
                target_mb: dom0,
                max_mb: memory_mb,
                from_mb: dom0,
                target_set_ms: 0,
            },
            latency: SimLatency::default(),
            balloon_floor_mb: None,
            refuse_set_cpu: None,
            domains: Vec::new(),
        }
    }

    fn guests_mb(&self) -> u64 {
        self.domains.iter().map(|d| d.memory_mb).sum()
    }

    /// Where the balloon will settle: the target, but never below the floor
    /// when shrinking, never beyond the free memory when growing.
    fn balloon_goal(&self) -> u64 {
        let from = self.dom0.from_mb;
        let target = self.dom0.target_mb;
        if target < from {
            target.max(self.balloon_floor_mb.unwrap_or(0)).min(from)
        } else {
            target
                .min(self.memory_mb.saturating_sub(self.guests_mb()))
                .max(from)
        }
    }

    /// dom0's memory at `now_ms` under the balloon model.
    pub fn dom0_current_at(&self, now_ms: u64) -> u64 {
        let goal = self.balloon_goal();
        let from = self.dom0.from_mb;
        let elapsed = now_ms.saturating_sub(self.dom0.target_set_ms);
        let span = self.latency.balloon_ms;
        if span == 0 || elapsed >= span {
            return goal;
        }
        if goal >= from {
            from + (goal - from) * elapsed / span
        } else {
            from - (from - goal) * elapsed / span
        }
    }

    /// The node with dom0's current memory brought up to `now_ms`.
    pub fn materialized(&self, now_ms: u64) -> Self {
        let mut n = self.clone();
        n.dom0.current_mb = self.dom0_current_at(now_ms);
        n
    }

    fn free_mb(&self, now_ms: u64) -> u64 {
        self.memory_mb
            .saturating_sub(self.dom0_current_at(now_ms))
            .saturating_sub(self.guests_mb())
    }

    fn add_domain(&mut self, d: SimDomain, now_ms: u64) -> Result<(), HvError> {
        if self.domains.iter().any(|x| x.name == d.name) {
            return Err(HvError::DomainExists { name: d.name });
        }
        let free = self.free_mb(now_ms);
        if free < d.memory_mb {
            return Err(HvError::NoMemory {
                name: d.name,
                needed_mb: d.memory_mb,
                free_mb: free,
                total_mb: self.memory_mb,
                dom0_mb: self.dom0_current_at(now_ms),
                guests_mb: self.guests_mb(),
            });
        }
        self.domains.push(d);
        Ok(())
    }
}

/// A handle on a sim directory.
#[derive(Clone, Debug)]
pub struct Sim {
    dir: PathBuf,
}

impl Sim {
    /// Creates `<dir>/node.json` (the directory too). Refuses to overwrite an
    /// existing node unless `force`.
    pub fn init(dir: &Path, node: &SimNode, force: bool) -> Result<Self, HvError> {
        std::fs::create_dir_all(dir).map_err(|source| HvError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let sim = Self {
            dir: dir.to_path_buf(),
        };
        let _lock = sim.lock()?;
        if sim.node_path().exists() && !force {
            return Err(HvError::Config(format!(
                "{} already exists (use --force to replace it)",
                sim.node_path().display()
            )));
        }
        sim.write(node)?;
        Ok(sim)
    }

    /// Opens an existing sim node; fails if `node.json` is missing or invalid.
    pub fn open(dir: &Path) -> Result<Self, HvError> {
        let sim = Self {
            dir: dir.to_path_buf(),
        };
        sim.read()?;
        Ok(sim)
    }

    pub fn node_path(&self) -> PathBuf {
        self.dir.join(NODE_FILE)
    }

    fn lock(&self) -> Result<FileLock, HvError> {
        let path = self.dir.join(LOCK_FILE);
        lock_exclusive(&path, LOCK_TIMEOUT).map_err(|e| match e {
            LockError::Io(source) => HvError::Io { path, source },
            LockError::Timeout(w) => HvError::Busy {
                path,
                waited_ms: w.as_millis() as u64,
            },
        })
    }

    fn read(&self) -> Result<SimNode, HvError> {
        let path = self.node_path();
        let text = std::fs::read_to_string(&path).map_err(|source| HvError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| HvError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    fn write(&self, node: &SimNode) -> Result<(), HvError> {
        let path = self.node_path();
        let mut text = serde_json::to_vec_pretty(node).map_err(|e| HvError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        text.push(b'\n');
        write_atomic(&path, &text, 0o644).map_err(|source| HvError::Io { path, source })
    }

    /// Runs `f` on the node under the lock and writes the result back.
    fn update<R>(
        &self,
        f: impl FnOnce(&mut SimNode, u64) -> Result<R, HvError>,
    ) -> Result<R, HvError> {
        let _lock = self.lock()?;
        let mut node = self.read()?;
        let now = protocol::now_ms();
        let r = f(&mut node, now)?;
        node.dom0.current_mb = node.dom0_current_at(now);
        self.write(&node)?;
        Ok(r)
    }

    /// The node as of now (dom0's current memory brought up to date); reads only.
    pub fn node(&self) -> Result<SimNode, HvError> {
        let _lock = self.lock()?;
        Ok(self.read()?.materialized(protocol::now_ms()))
    }

    /// Adds a guest that is not the pilot's (for tests and demos).
    /// Sets (or clears) the fault that makes every CPU share change fail.
    pub fn refuse_set_cpu(&self, reason: Option<String>) -> Result<(), HvError> {
        self.update(|node, _| {
            node.refuse_set_cpu = reason;
            Ok(())
        })
    }

    pub fn add_foreign_domain(&self, name: &str, memory_mb: u64, cpus: u32) -> Result<(), HvError> {
        self.update(|node, now| {
            node.add_domain(
                SimDomain {
                    name: name.to_string(),
                    memory_mb,
                    cpus,
                    state: "running".to_string(),
                    image: String::new(),
                    created_ms: now,
                    nics: Vec::new(),
                    boot_id: random_boot_id(),
                    files: Vec::new(),
                    cpu: None,
                    urgency: 0,
                },
                now,
            )
        })
    }

    /// Writes `file` on guest `name`'s disk (what a user does in a real
    /// guest; tests check whose files a guest sees).
    pub fn write_guest_file(&self, name: &str, file: &str) -> Result<(), HvError> {
        self.update(|node, _| {
            let d = node
                .domains
                .iter_mut()
                .find(|d| d.name == name)
                .ok_or_else(|| HvError::NoSuchDomain {
                    name: name.to_string(),
                })?;
            if !d.files.iter().any(|f| f == file) {
                d.files.push(file.to_string());
            }
            Ok(())
        })
    }

    fn set_state(&self, name: &str, state: &str) -> Result<(), HvError> {
        self.update(|node, _| {
            let d = node
                .domains
                .iter_mut()
                .find(|d| d.name == name)
                .ok_or_else(|| HvError::NoSuchDomain {
                    name: name.to_string(),
                })?;
            d.state = state.to_string();
            Ok(())
        })
    }

    fn latency(&self) -> Result<SimLatency, HvError> {
        let _lock = self.lock()?;
        Ok(self.read()?.latency)
    }
}

impl Hypervisor for Sim {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn dom0_memory(&self) -> Result<Dom0Memory, HvError> {
        let n = self.node()?;
        Ok(Dom0Memory {
            current_mb: n.dom0.current_mb,
            target_mb: n.dom0.target_mb,
            max_mb: n.dom0.max_mb,
        })
    }

    fn set_dom0_target(&self, mb: u64) -> Result<(), HvError> {
        self.update(|node, now| {
            if mb > node.dom0.max_mb {
                return Err(HvError::AboveMax {
                    target_mb: mb,
                    max_mb: node.dom0.max_mb,
                });
            }
            let current = node.dom0_current_at(now);
            node.dom0.from_mb = current;
            node.dom0.current_mb = current;
            node.dom0.target_mb = mb;
            node.dom0.target_set_ms = now;
            Ok(())
        })
    }

    fn domains(&self) -> Result<Vec<Domain>, HvError> {
        let n = self.node()?;
        Ok(n.domains
            .into_iter()
            .map(|d| Domain {
                name: d.name,
                memory_mb: d.memory_mb,
                cpus: d.cpus,
                state: d.state,
            })
            .collect())
    }

    fn create(&self, vm: &VmLaunch) -> Result<(), HvError> {
        let create_ms = self.update(|node, now| {
            node.add_domain(
                SimDomain {
                    name: vm.name.clone(),
                    memory_mb: vm.memory_mb,
                    cpus: vm.cpus,
                    state: "running".to_string(),
                    image: vm.image.clone(),
                    created_ms: now,
                    nics: vm.nics.clone(),
                    boot_id: random_boot_id(),
                    files: Vec::new(),
                    cpu: vm.cpu.filter(|c| !c.is_default()),
                    urgency: vm.urgency,
                },
                now,
            )?;
            Ok(node.latency.create_ms)
        })?;
        std::thread::sleep(Duration::from_millis(create_ms));
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        let n = self.node()?;
        if !n.domains.iter().any(|d| d.name == name) {
            return Err(HvError::NoSuchDomain {
                name: name.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(self.latency()?.destroy_ms));
        self.update(|node, _| {
            let before = node.domains.len();
            node.domains.retain(|d| d.name != name);
            if node.domains.len() == before {
                return Err(HvError::NoSuchDomain {
                    name: name.to_string(),
                });
            }
            Ok(())
        })
    }

    /// Takes `save_ms_per_gb` of the guest's memory (stopped meanwhile);
    /// one that would end past `deadline` waits until then and fails,
    /// leaving the guest running, as a real save that runs out of time.
    fn save(
        &self,
        name: &str,
        out: &mut CheckpointWriter,
        deadline: Instant,
    ) -> Result<serde_json::Value, HvError> {
        let t0 = Instant::now();
        let n = self.node()?;
        let d = n
            .domains
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| HvError::NoSuchDomain {
                name: name.to_string(),
            })?
            .clone();
        if d.state != "running" {
            return Err(HvError::Config(format!(
                "{name} is {}, not running: nothing to save",
                d.state
            )));
        }
        self.set_state(name, "paused")?;
        let cost = SimLatency::per_gb(n.latency.save_ms_per_gb, d.memory_mb);
        if t0 + cost > deadline {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            self.set_state(name, "running")?;
            return Err(HvError::Timeout {
                what: format!(
                    "saving {name} ({} MB at {} ms/GB)",
                    d.memory_mb, n.latency.save_ms_per_gb
                ),
                after_ms: t0.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(cost);
        let saved = SimSaved {
            name: d.name.clone(),
            memory_mb: d.memory_mb,
            cpus: d.cpus,
            image: d.image.clone(),
            boot_id: d.boot_id.clone(),
            created_ms: d.created_ms,
            files: d.files.clone(),
        };
        let result = (|| {
            let mut f = out.create(SIM_STATE)?;
            let mut line = serde_json::to_vec(&saved).map_err(|e| HvError::Corrupt {
                path: self.node_path(),
                message: e.to_string(),
            })?;
            line.push(b'\n');
            let ioerr = |e| {
                HvError::Checkpoint(CkError::Io {
                    path: out.dir().join(SIM_STATE),
                    source: e,
                })
            };
            f.write_all(&line).map_err(ioerr)?;
            let block: Vec<u8> = (0..1024u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
                .collect();
            for _ in 0..d.memory_mb {
                f.write_all(&block).map_err(ioerr)?;
            }
            let e = f.finish()?;
            out.add(e);
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.set_state(name, "running");
            return Err(e);
        }
        self.set_state(name, "saved")?;
        Ok(serde_json::json!({ "sim": 1 }))
    }

    fn resume_after_save(&self, name: &str) -> Result<(), HvError> {
        self.set_state(name, "running")
    }

    /// Reads and verifies the checkpoint, takes `restore_ms_per_gb`, and
    /// adds the guest under the launch's name with the saved boot id.
    fn restore(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let t0 = Instant::now();
        let mut text = Vec::new();
        let path = self.node_path();
        from.open(SIM_STATE)?
            .read_to_end(&mut text)
            .map_err(|e| CkError::from_io(e, &path))?;
        let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
        let saved: SimSaved = serde_json::from_slice(line).map_err(|e| HvError::Corrupt {
            path: path.clone(),
            message: format!("checkpoint {}: {e}", from.id()),
        })?;
        if saved.memory_mb != vm.memory_mb || saved.cpus != vm.cpus {
            return Err(HvError::Incompatible(format!(
                "saved with {} MB and {} CPUs, launched with {} MB and {} CPUs",
                saved.memory_mb, saved.cpus, vm.memory_mb, vm.cpus
            )));
        }
        let cost = SimLatency::per_gb(self.latency()?.restore_ms_per_gb, vm.memory_mb);
        if t0 + cost > deadline {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            return Err(HvError::Timeout {
                what: format!("restoring {}", vm.name),
                after_ms: t0.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(cost.saturating_sub(t0.elapsed()));
        self.update(|node, now| {
            node.add_domain(
                SimDomain {
                    name: vm.name.clone(),
                    memory_mb: vm.memory_mb,
                    cpus: vm.cpus,
                    state: "running".to_string(),
                    image: vm.image.clone(),
                    created_ms: now,
                    nics: vm.nics.clone(),
                    boot_id: saved.boot_id.clone(),
                    files: saved.files.clone(),
                    cpu: vm.cpu.filter(|c| !c.is_default()),
                    urgency: vm.urgency,
                },
                now,
            )
        })
    }

    /// Ready `boot_ms` after it was created.
    fn is_ready(&self, name: &str) -> Result<bool, HvError> {
        let n = self.node()?;
        let d = n
            .domains
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| HvError::NoSuchDomain {
                name: name.to_string(),
            })?;
        Ok(protocol::now_ms() >= d.created_ms + n.latency.boot_ms)
    }

    fn cpu_control(&self) -> CpuControl {
        CpuControl {
            available: true,
            mechanism: format!("sim (recorded in {})", self.node_path().display()),
            reason: None,
        }
    }

    /// Records the share on the guest.
    fn set_cpu(&self, name: &str, cpu: &CpuShare, urgency: u8) -> Result<String, HvError> {
        self.update(|node, _| {
            if let Some(why) = &node.refuse_set_cpu {
                return Err(HvError::Config(format!("sim: {why}")));
            }
            let d = node
                .domains
                .iter_mut()
                .find(|d| d.name == name)
                .ok_or_else(|| HvError::NoSuchDomain {
                    name: name.to_string(),
                })?;
            d.cpu = Some(*cpu).filter(|c| !c.is_default());
            d.urgency = urgency;
            Ok(())
        })?;
        Ok("sim".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::set_dom0_target_and_wait;
    use protocol::{SlotId, VmId, VmName};

    fn launch(memory_mb: u64) -> VmLaunch {
        let vm_id = VmId::generate();
        VmLaunch {
            name: VmName::new(SlotId::generate(), vm_id.clone()).to_string(),
            vm_id,
            memory_mb,
            cpus: 1,
            image: "img.qcow2".into(),
            image_source: None,
            nics: Vec::new(),
            hostname: None,
            context: None,
            on_preempt: Default::default(),
            restore: None,
            urgency: 0,
            cpu: None,
        }
    }

    #[test]
    fn init_refuses_to_overwrite_an_existing_node_without_force() {
        let dir = tempfile::tempdir().unwrap();
        Sim::init(dir.path(), &SimNode::new(4096, 2, None), false).unwrap();
        assert!(Sim::init(dir.path(), &SimNode::new(1024, 1, None), false).is_err());
        Sim::init(dir.path(), &SimNode::new(1024, 1, None), true).unwrap();
        assert_eq!(
            Sim::open(dir.path()).unwrap().node().unwrap().memory_mb,
            1024
        );
    }

    #[test]
    fn open_fails_on_a_directory_without_a_node() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Sim::open(dir.path()), Err(HvError::Io { .. })));
    }

    #[test]
    fn create_needs_free_memory_and_a_unique_name() {
        let dir = tempfile::tempdir().unwrap();
        let sim = Sim::init(dir.path(), &SimNode::new(4096, 2, None), false).unwrap();
        let vm = launch(1024);
        let e = sim.create(&vm).unwrap_err();
        assert!(e.to_string().contains("needs 1024 MB, 0 MB free"), "{e}");
        set_dom0_target_and_wait(&sim, 3072, Duration::from_secs(1)).unwrap();
        sim.create(&vm).unwrap();
        assert!(matches!(sim.create(&vm), Err(HvError::DomainExists { .. })));
        assert_eq!(sim.domains().unwrap().len(), 1);
        sim.destroy(&vm.name).unwrap();
        assert!(matches!(
            sim.destroy(&vm.name),
            Err(HvError::NoSuchDomain { .. })
        ));
    }

    #[test]
    fn balloon_reaches_its_target_only_after_the_latency() {
        let mut node = SimNode::new(4096, 2, None);
        node.latency.balloon_ms = 100;
        node.dom0.from_mb = 4096;
        node.dom0.target_mb = 3096;
        node.dom0.target_set_ms = 1_000;
        assert_eq!(node.dom0_current_at(1_000), 4096);
        assert_eq!(node.dom0_current_at(1_050), 3596);
        assert_eq!(node.dom0_current_at(1_100), 3096);
        assert_eq!(node.dom0_current_at(9_999), 3096);
    }

    #[test]
    fn balloon_never_goes_below_its_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut node = SimNode::new(4096, 2, None);
        node.balloon_floor_mb = Some(3500);
        let sim = Sim::init(dir.path(), &node, false).unwrap();
        let e = set_dom0_target_and_wait(&sim, 2048, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("current 3500 MB"), "{e}");
        set_dom0_target_and_wait(&sim, 4096, Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn balloon_cannot_grow_into_memory_guests_hold() {
        let mut node = SimNode::new(4096, 2, Some(3072));
        node.domains.push(SimDomain {
            name: "other".into(),
            memory_mb: 1024,
            cpus: 1,
            state: "running".into(),
            image: String::new(),
            created_ms: 0,
            nics: Vec::new(),
            boot_id: String::new(),
            files: Vec::new(),
            cpu: None,
            urgency: 0,
        });
        node.dom0.target_mb = 4096;
        node.dom0.from_mb = 3072;
        assert_eq!(node.dom0_current_at(10), 3072);
    }
}
