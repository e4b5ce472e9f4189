//! kvm checkpoints: a VM's memory state through QMP migration to a pipe the
//! pilot reads, and its copy-on-write overlay (the disk writes) beside it.
//!
//! Save: `stop`, pass the write end of a pipe to QEMU (`getfd`), `migrate`
//! to `fd:`; a thread reads the other end (through `zstd -1` when
//! configured) into the checkpoint, hashing as it goes (QEMU 7.2 has no
//! `file:` URI, and a pipe keeps file names out of shell commands). The
//! guest stays stopped until the caller has committed and destroys it;
//! `cont` brings it back if it cannot. Restore: copy and verify the overlay,
//! point it at this node's base image, start QEMU with `-S -incoming
//! defer`, `migrate-incoming` from a pipe fed from the file as it is
//! verified, and `cont` only if every byte matched. A warm start restores
//! a template (booted with the warm layout and no identity) the same way,
//! under a new VM generation id, then plugs in the launch's NICs and seed.
//! Not the store's format.

use super::{
    nic_args, nic_slot, qmp_err, random_uuid, run_bounded, seed, seed_args, Accel, Kvm, Layout,
    VmMeta, MAX_FIXED_NICS, SEED_SLOT,
};
use crate::checkpoint::{CheckpointReader, CheckpointWriter, CkError, PartFile};
use crate::hypervisor::HvError;
use protocol::pilot::VmLaunch;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Memory state, as QEMU streams it.
const MEMORY: &str = "memory";
/// Memory state through `zstd -1`.
const MEMORY_ZST: &str = "memory.zst";
/// The VM's overlay (its disk writes).
const DISK: &str = "disk.qcow2";
const PIPE_BYTES: i32 = 1 << 20;
const COPY_BUFFER: usize = 1 << 20;

/// What the manifest records about a kvm checkpoint (its `driver` part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvmCheckpoint {
    pub accel: Accel,
    pub hugepages: bool,
    pub page_kb: u64,
    /// The memory file and how it was compressed (`zstd` or `none`).
    pub memory_file: String,
    pub compressor: String,
    /// The overlay's base on the node that saved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskInfo>,
    /// `query-version` of the QEMU that saved it.
    #[serde(default)]
    pub qemu: String,
    /// Its VM generation id, when it has the warm layout ([`Layout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<String>,
    /// Seed and NICs at fixed PCI slots (the warm layout): a template
    /// saved so can be restored for a warm start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed_slots: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub base: PathBuf,
    pub base_format: String,
    pub base_bytes: u64,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), HvError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| HvError::Io {
        path: PathBuf::from("pipe"),
        source: e.into(),
    })?;
    // Bigger than the default 64 KiB: fewer wake-ups per GB (best effort).
    let _ = nix::fcntl::fcntl(
        w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES),
    );
    Ok((r, w))
}

/// Copies `from` into `to` with a large buffer; returns the bytes.
fn pump(from: &mut dyn Read, to: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut n = 0u64;
    loop {
        let k = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..k])?;
        n += k as u64;
    }
    to.flush()?;
    Ok(n)
}

/// Waits for a thread at most until `until`; `None` if it has not ended.
fn join_by<T>(h: JoinHandle<T>, until: Instant) -> Option<std::thread::Result<T>> {
    while !h.is_finished() {
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Some(h.join())
}

/// Waits for a child at most until `until`, then kills it.
fn wait_child(mut c: Child, until: Instant, what: &str) -> Result<(), HvError> {
    loop {
        match c.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => {
                let mut err = String::new();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(HvError::KvmCommand {
                    command: what.to_string(),
                    message: format!("exited with {s}"),
                    output: err.trim().to_string(),
                });
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) | Err(_) => {
                let _ = c.kill();
                let _ = c.wait();
                return Err(HvError::KvmTimeout {
                    what: what.to_string(),
                    after_ms: 0,
                });
            }
        }
    }
}

impl Kvm {
    fn zstd(&self) -> Result<bool, HvError> {
        match self.cfg.compressor.as_str() {
            "zstd" => Ok(true),
            "none" => Ok(false),
            other => Err(HvError::Config(format!(
                "[kvm] compressor {other:?}: expected zstd or none"
            ))),
        }
    }

    /// See [`crate::hypervisor::Hypervisor::save`]: on error the guest runs on.
    pub(super) fn save_checkpoint(
        &self,
        name: &str,
        out: &mut CheckpointWriter,
        deadline: Instant,
    ) -> Result<serde_json::Value, HvError> {
        let t0 = Instant::now();
        let deadline = deadline.min(t0 + Kvm::timeout(self.cfg.save_timeout_s));
        let meta = self.read_meta(name)?.ok_or_else(|| HvError::NoSuchDomain {
            name: name.to_string(),
        })?;
        self.read_pid(name)
            .filter(|p| super::is_our_qemu(*p, name))
            .ok_or_else(|| HvError::NoSuchDomain {
                name: name.to_string(),
            })?;
        let zstd = self.zstd()?;
        let mut q = self.qmp(name)?;
        let qemu = q
            .execute("query-version", None)
            .map(|v| v["qemu"].to_string())
            .unwrap_or_default();
        q.execute("stop", None).map_err(|e| qmp_err(name, e))?;
        let r = self
            .save_memory(name, &mut q, out, zstd, deadline)
            .and_then(|mem| {
                let disk = match &meta.overlay {
                    Some(o) => Some(self.save_disk(&meta, o, out)?),
                    None => None,
                };
                Ok((mem, disk))
            });
        let (memory_file, disk) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = q.execute("migrate_cancel", None);
                if let Err(c) = q.execute("cont", None) {
                    tracing::error!(vm = name, error = %c, "guest not resumed after a failed save");
                }
                return Err(e);
            }
        };
        tracing::info!(
            node = %self.node,
            vm = name,
            bytes = out.bytes(),
            save_ms = t0.elapsed().as_millis() as u64,
            "VM saved"
        );
        let info = KvmCheckpoint {
            accel: self.accel,
            hugepages: self.cfg.hugepages,
            page_kb: self.pages.page_kb,
            memory_file,
            compressor: self.cfg.compressor.clone(),
            disk,
            qemu,
            vmgenid: meta.vmgenid.clone(),
            fixed_slots: meta.fixed_slots,
        };
        serde_json::to_value(&info).map_err(|e| HvError::Config(e.to_string()))
    }

    /// Streams the memory state into the checkpoint; returns the file's name.
    fn save_memory(
        &self,
        name: &str,
        q: &mut super::qmp::Qmp,
        out: &mut CheckpointWriter,
        zstd: bool,
        deadline: Instant,
    ) -> Result<String, HvError> {
        let e = |err| qmp_err(name, err);
        let file = if zstd { MEMORY_ZST } else { MEMORY };
        let mut part = out.create(file)?;
        let (rd, wr) = pipe()?;
        let (mut src, child): (Box<dyn Read + Send>, Option<Child>) = if zstd {
            let mut c = Command::new(&self.cfg.zstd)
                .args(["-1", "-q", "-c"])
                .stdin(Stdio::from(rd))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|err| HvError::KvmCommand {
                    command: format!("{} -1 -q -c", self.cfg.zstd),
                    message: format!("cannot start: {err}"),
                    output: String::new(),
                })?;
            let stdout = c.stdout.take().ok_or_else(|| HvError::KvmCommand {
                command: self.cfg.zstd.clone(),
                message: "no stdout".into(),
                output: String::new(),
            })?;
            (Box::new(stdout), Some(c))
        } else {
            (Box::new(File::from(rd)), None)
        };
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 10_737_418_240u64 })),
        )
        .map_err(e)?;
        q.execute_with_fd(
            "getfd",
            Some(json!({ "fdname": "wsp-save" })),
            wr.as_raw_fd(),
        )
        .map_err(e)?;
        drop(wr);
        let copier = std::thread::spawn(move || -> std::io::Result<PartFile> {
            pump(&mut src, &mut part)?;
            Ok(part)
        });
        q.execute("migrate", Some(json!({ "uri": "fd:wsp-save" })))
            .map_err(e)?;
        let failed = loop {
            let m: super::qmp::MigrationInfo = q.query("query-migrate").map_err(e)?;
            match m.status.as_deref() {
                Some("completed") => break None,
                Some("failed") | Some("cancelled") => {
                    break Some(HvError::Qmp {
                        vm: name.to_string(),
                        message: format!(
                            "saving the memory state failed: {}",
                            m.error_desc.unwrap_or_default()
                        ),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = q.execute("migrate_cancel", None);
                break Some(HvError::KvmTimeout {
                    what: format!("saving {name}'s memory state"),
                    after_ms: 0,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // QEMU has closed its end (done or cancelled): the copier sees EOF.
        let until = Instant::now() + Duration::from_secs(10);
        let copied = join_by(copier, until);
        let zstd_done = child.map(|c| wait_child(c, until, "zstd -1 (checkpoint compression)"));
        if let Some(err) = failed {
            // QEMU says "Broken pipe" when the pilot stopped reading because
            // its write failed (a full store): report that cause.
            if let Some(Ok(Err(io))) = copied {
                return Err(HvError::Checkpoint(CkError::Io {
                    path: out.dir().join(file),
                    source: io,
                }));
            }
            return Err(err);
        }
        let part = match copied {
            Some(Ok(Ok(p))) => p,
            Some(Ok(Err(err))) => {
                return Err(HvError::Checkpoint(CkError::Io {
                    path: out.dir().join(file),
                    source: err,
                }))
            }
            Some(Err(_)) => {
                return Err(HvError::Config(
                    "the thread copying the memory state panicked".into(),
                ))
            }
            None => {
                return Err(HvError::KvmTimeout {
                    what: format!("copying {name}'s memory state after QEMU finished"),
                    after_ms: 10_000,
                })
            }
        };
        if let Some(r) = zstd_done {
            r?;
        }
        let entry = part.finish()?;
        out.add(entry);
        Ok(file.to_string())
    }

    /// Copies the overlay (flushed and released by QEMU when the migration
    /// completed) into the checkpoint.
    fn save_disk(
        &self,
        meta: &VmMeta,
        overlay: &Path,
        out: &mut CheckpointWriter,
    ) -> Result<DiskInfo, HvError> {
        let base = self.resolve_image(&meta.image)?;
        let base = base.disk_base().ok_or_else(|| {
            HvError::Config(format!(
                "{} has an overlay but its image {:?} has no disk",
                meta.name, meta.image
            ))
        })?;
        let base_format = self.image_format(base)?;
        let base_bytes = std::fs::metadata(base)
            .map_err(|e| HvError::Io {
                path: base.to_path_buf(),
                source: e,
            })?
            .len();
        let mut part = out.create(DISK)?;
        let mut f = File::open(overlay).map_err(|e| HvError::Io {
            path: overlay.to_path_buf(),
            source: e,
        })?;
        pump(&mut f, &mut part).map_err(|e| {
            HvError::Checkpoint(CkError::Io {
                path: out.dir().join(DISK),
                source: e,
            })
        })?;
        let entry = part.finish()?;
        out.add(entry);
        Ok(DiskInfo {
            base: base.to_path_buf(),
            base_format,
            base_bytes,
        })
    }

    fn checkpoint_info(from: &CheckpointReader) -> Result<KvmCheckpoint, HvError> {
        serde_json::from_value(from.manifest().driver.clone())
            .map_err(|e| HvError::Incompatible(format!("not a kvm checkpoint ({e})")))
    }

    /// See [`crate::hypervisor::Hypervisor::restore`]: the same guest, with
    /// the devices (and generation id) it was saved with.
    pub(super) fn restore_checkpoint(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let info = Self::checkpoint_info(from)?;
        let layout = Layout {
            fixed_slots: info.fixed_slots,
            vmgenid: info.vmgenid.clone(),
        };
        self.restore_as(vm, None, from, &info, &layout, deadline)
    }

    /// See [`crate::hypervisor::Hypervisor::restore_warm`]: the template
    /// restored under the launch's name and a new generation id, on a
    /// fresh copy of its overlay; then the launch's NICs and seed plugged
    /// in at their fixed slots.
    pub(super) fn restore_warm_checkpoint(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let info = Self::checkpoint_info(from)?;
        if !info.fixed_slots {
            return Err(HvError::Incompatible(format!(
                "{} is not a warm snapshot (not made by prepare_warm): its devices cannot be plugged in afresh",
                from.id()
            )));
        }
        if vm.nics.len() > MAX_FIXED_NICS {
            return Err(HvError::Config(format!(
                "{}: {} NICs; the warm layout has room for {MAX_FIXED_NICS}",
                vm.name,
                vm.nics.len()
            )));
        }
        let mut template = vm.clone();
        template.nics.clear();
        template.context = None;
        let layout = Layout {
            fixed_slots: true,
            vmgenid: Some(random_uuid()),
        };
        self.restore_as(&template, Some(vm), from, &info, &layout, deadline)
    }

    /// Restores `vm` from `from`; with `identity`, plugs its NICs and seed in
    /// once the guest runs. On failure nothing of it is left.
    fn restore_as(
        &self,
        vm: &VmLaunch,
        identity: Option<&VmLaunch>,
        from: &CheckpointReader,
        info: &KvmCheckpoint,
        layout: &Layout,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let t0 = Instant::now();
        let deadline = deadline.min(t0 + Kvm::timeout(self.cfg.save_timeout_s));
        let name = &vm.name;
        if !super::valid_name(name) {
            return Err(HvError::Config(format!(
                "VM name {name:?}: only letters, digits, '-', '_' and '.' are allowed"
            )));
        }
        if let Some(id) = identity {
            self.check_share(id)?;
        } else {
            self.check_share(vm)?;
        }
        if info.accel != self.accel {
            return Err(HvError::Incompatible(format!(
                "saved under {}, this node runs {}",
                info.accel.as_str(),
                self.accel.as_str()
            )));
        }
        if info.hugepages != self.cfg.hugepages
            || (info.hugepages && info.page_kb != self.pages.page_kb)
        {
            return Err(HvError::Incompatible(format!(
                "saved with hugepages = {} (pages of {} kB), this node has hugepages = {} ({} kB)",
                info.hugepages, info.page_kb, self.cfg.hugepages, self.pages.page_kb
            )));
        }
        let boot = self.resolve_image(&vm.image)?;
        let base = boot.disk_base().map(Path::to_path_buf);
        match (&base, &info.disk, from.has(DISK)) {
            (Some(b), Some(d), true) => {
                let here = std::fs::metadata(b)
                    .map_err(|e| HvError::Io {
                        path: b.clone(),
                        source: e,
                    })?
                    .len();
                if here != d.base_bytes {
                    return Err(HvError::Incompatible(format!(
                        "the base image {} is {here} bytes here; the overlay was saved over {} of {} bytes",
                        b.display(),
                        d.base.display(),
                        d.base_bytes
                    )));
                }
            }
            (None, None, false) => {}
            (Some(b), _, _) => {
                return Err(HvError::Incompatible(format!(
                    "the image {} has a disk, the checkpoint has no overlay",
                    b.display()
                )))
            }
            (None, _, _) => {
                return Err(HvError::Incompatible(format!(
                    "the checkpoint has a disk overlay, the image {:?} has no disk",
                    vm.image
                )))
            }
        }
        if self.read_meta(name)?.is_some() {
            if self
                .read_pid(name)
                .is_some_and(|p| super::is_our_qemu(p, name))
            {
                return Err(HvError::DomainExists { name: name.clone() });
            }
            self.remove_files(name, false);
        }
        let r = self
            .restore_inner(vm, from, info, &boot, base.as_deref(), layout, deadline)
            .and_then(|()| match identity {
                Some(id) => self.plug_identity(id),
                None => Ok(()),
            });
        match r {
            Ok(()) => {
                tracing::info!(
                    node = %self.node,
                    vm = %name,
                    checkpoint = %from.id(),
                    restore_ms = t0.elapsed().as_millis() as u64,
                    "VM restored"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(node = %self.node, vm = %name, error = %e, "VM not restored; cleaning its files");
                if let Some(pid) = self.read_pid(name) {
                    self.kill_and_reap(name, pid);
                }
                self.remove_network(name);
                self.remove_cgroup(name);
                self.remove_files(name, false);
                // A stream QEMU or zstd choked on may be a corrupted file:
                // say so rather than the symptom.
                let known = match &e {
                    HvError::Incompatible(_) => true,
                    HvError::Checkpoint(ck) => ck.is_corrupt(),
                    _ => false,
                };
                if !known {
                    if let Err(ck) = from.verified_path(&info.memory_file) {
                        if ck.is_corrupt() {
                            return Err(ck.into());
                        }
                    }
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn restore_inner(
        &self,
        vm: &VmLaunch,
        from: &CheckpointReader,
        info: &KvmCheckpoint,
        boot: &super::Boot,
        base: Option<&Path>,
        layout: &Layout,
        deadline: Instant,
    ) -> Result<(), HvError> {
        let name = &vm.name;
        let e = |err| qmp_err(name, err);
        let overlay = match base {
            Some(base) => {
                let o = self.file(name, "qcow2");
                from.copy_to(DISK, &o)?;
                // The overlay names the base of the node that saved it.
                let fmt = self.image_format(base)?;
                let mut cmd = Command::new(&self.cfg.qemu_img);
                cmd.args(["rebase", "-u", "-f", "qcow2", "-F", &fmt, "-b"])
                    .arg(base)
                    .arg(&o);
                let shown = format!(
                    "{} rebase -u -F {fmt} -b {} {}",
                    self.cfg.qemu_img,
                    base.display(),
                    o.display()
                );
                run_bounded(cmd, None, Kvm::timeout(self.cfg.command_timeout_s), &shown)?;
                Some(o)
            }
            None => None,
        };
        let meta = self.prepare(vm, boot, overlay, layout)?;
        let mut q = self.launch_qemu(&meta, &["-S", "-incoming", "defer"])?;
        let (rd, wr) = pipe()?;
        let (mut sink, child): (Box<dyn Write + Send>, Option<Child>) =
            match info.compressor.as_str() {
                "zstd" => {
                    let mut c = Command::new(&self.cfg.zstd)
                        .args(["-d", "-c", "-q"])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::from(wr))
                        .stderr(Stdio::piped())
                        .spawn()
                        .map_err(|err| HvError::KvmCommand {
                            command: format!("{} -d -c -q", self.cfg.zstd),
                            message: format!("cannot start: {err}"),
                            output: String::new(),
                        })?;
                    let stdin = c.stdin.take().ok_or_else(|| HvError::KvmCommand {
                        command: self.cfg.zstd.clone(),
                        message: "no stdin".into(),
                        output: String::new(),
                    })?;
                    (Box::new(stdin), Some(c))
                }
                "none" => (Box::new(File::from(wr)), None),
                other => {
                    return Err(HvError::Incompatible(format!(
                        "memory compressed with {other:?}, this pilot reads zstd or none"
                    )))
                }
            };
        q.execute_with_fd(
            "getfd",
            Some(json!({ "fdname": "wsp-restore" })),
            rd.as_raw_fd(),
        )
        .map_err(e)?;
        drop(rd);
        q.execute("migrate-incoming", Some(json!({ "uri": "fd:wsp-restore" })))
            .map_err(e)?;
        let mut reader = from.open(&info.memory_file)?;
        let memory_path = PathBuf::from(&info.memory_file);
        let feeder = std::thread::spawn(move || -> Result<u64, CkError> {
            let r = pump(&mut reader, &mut sink).map_err(|err| CkError::from_io(err, &memory_path));
            drop(sink);
            r
        });
        // The guest stays paused (-S) whatever QEMU loaded; it runs only
        // once the feeder has verified every byte.
        let loaded = loop {
            let s = match q.status() {
                Ok(s) => s,
                Err(err) => break Err(e(err)),
            };
            match s.status.as_str() {
                "inmigrate" => {}
                "paused" | "postmigrate" | "prelaunch" => break Ok(()),
                other => {
                    break Err(HvError::Qmp {
                        vm: name.clone(),
                        message: format!(
                            "loading the memory state ended in state {other}: {}",
                            self.log_tail(name)
                        ),
                    })
                }
            }
            if Instant::now() >= deadline {
                break Err(HvError::KvmTimeout {
                    what: format!("loading {name}'s memory state"),
                    after_ms: 0,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let until = Instant::now() + Duration::from_secs(10);
        let fed = join_by(feeder, until);
        let unzstd = child.map(|c| wait_child(c, until, "zstd -d (checkpoint decompression)"));
        match fed {
            Some(Ok(Ok(_))) => {}
            Some(Ok(Err(ck))) => return Err(ck.into()),
            Some(Err(_)) => {
                return Err(HvError::Config(
                    "the thread feeding the memory state panicked".into(),
                ))
            }
            None => {
                return Err(HvError::KvmTimeout {
                    what: format!("feeding {name}'s memory state"),
                    after_ms: 10_000,
                })
            }
        }
        loaded?;
        if let Some(r) = unzstd {
            r?;
        }
        q.execute("cont", None).map_err(e)?;
        let s = q.status().map_err(e)?;
        if !s.running {
            return Err(HvError::Qmp {
                vm: name.clone(),
                message: format!("restored but its state is {}", s.status),
            });
        }
        Ok(())
    }

    /// Gives a restored template the launch's identity: its taps (with
    /// DHCP and guard entries) and seed made as for a boot, recorded first,
    /// then plugged into the running guest at the warm layout's slots
    /// (QMP `netdev_add` + `device_add`, `blockdev-add` + `device_add`).
    fn plug_identity(&self, vm: &VmLaunch) -> Result<(), HvError> {
        let name = &vm.name;
        let e = |err| qmp_err(name, err);
        let mut meta = self
            .read_meta(name)?
            .ok_or_else(|| HvError::NoSuchDomain { name: name.clone() })?;
        let taps = self.net.plan(name, vm.hostname.as_deref(), &vm.nics)?;
        let seed = if vm.context.is_some() || !vm.nics.is_empty() {
            let p = self.file(name, "seed.img");
            let t = Kvm::timeout(self.cfg.command_timeout_s);
            seed::build(vm, &p, &self.cfg.mkfs_vfat, &self.cfg.mcopy, t)?;
            Some(p)
        } else {
            None
        };
        // The record says what a boot of this VM would have had.
        if let Some(p) = &seed {
            meta.argv.extend(seed_args(p, true));
        }
        meta.argv.extend(nic_args(&taps, true));
        meta.taps = taps.clone();
        meta.seed = seed.clone();
        self.write_meta(&meta)?;
        if !taps.is_empty() {
            self.net.setup(name, &taps, &|| self.node_taps(None))?;
        }
        let mut q = self.qmp(name)?;
        for (i, t) in taps.iter().enumerate() {
            let id = format!("wsp-n{i}");
            q.execute(
                "netdev_add",
                Some(json!({"type": "tap", "id": id, "ifname": t.tap, "script": "no", "downscript": "no"})),
            )
            .map_err(e)?;
            q.execute(
                "device_add",
                Some(json!({
                    "driver": "virtio-net-pci",
                    "netdev": id,
                    "mac": t.mac,
                    "addr": format!("{:#x}", nic_slot(i)),
                    "id": format!("wsp-nic{i}"),
                })),
            )
            .map_err(e)?;
        }
        if let Some(p) = &seed {
            q.execute(
                "blockdev-add",
                Some(json!({
                    "driver": "raw",
                    "node-name": "wsp-seed",
                    "read-only": true,
                    "file": {"driver": "file", "filename": p, "read-only": true},
                })),
            )
            .map_err(e)?;
            q.execute(
                "device_add",
                Some(json!({
                    "driver": "virtio-blk-pci",
                    "drive": "wsp-seed",
                    "addr": format!("{SEED_SLOT:#x}"),
                    "id": "wsp-seed-dev",
                })),
            )
            .map_err(e)?;
        }
        tracing::info!(node = %self.node, vm = %name, nics = taps.len(), seed = seed.is_some(), "identity plugged in");
        Ok(())
    }
}
