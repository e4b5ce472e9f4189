//! External programs (qemu-img, nft, xl, ...): which package provides each,
//! where one is found, and the one message for a missing one,
//! `qemu-img not found: install qemu-utils`.
//!
//! The table is `tools.txt` beside this file, shared with
//! `scripts/install-deps.sh`. Drivers turn a spawn that failed for want of
//! the program into [`Missing`] here; `workspace-pilot check` lists what a
//! driver needs with [`find`]. Not for running programs (drivers do, bounded).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `tools.txt`: command, Debian package, who needs it.
pub const TABLE: &str = include_str!("tools.txt");

/// Where sudo (Debian's `secure_path`) looks, whatever the caller's `PATH`.
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Where admin tools live that a user's `PATH` often lacks (nft, dnsmasq,
/// mkfs.vfat): named in the message when a program is only there.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// One line of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tool {
    pub command: &'static str,
    pub package: &'static str,
    /// `kvm`, `xen`, `prefix`, `tests`, `slurm`, `gridengine`.
    pub needed_by: &'static str,
}

/// Every line of the table, in order.
pub fn table() -> impl Iterator<Item = Tool> {
    TABLE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Tool {
                command: f.next()?,
                package: f.next()?,
                needed_by: f.next()?,
            })
        })
}

/// The package that provides `program` (looked up by its file name, so a
/// configured `/usr/bin/qemu-img` is found too).
pub fn package_of(program: &str) -> Option<&'static str> {
    let name = Path::new(program).file_name()?.to_str()?;
    table().find(|t| t.command == name).map(|t| t.package)
}

/// A program that is not where it would be run from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// As configured (a bare name or a path).
    pub program: String,
    pub package: Option<&'static str>,
    /// Not on `PATH`, but here in a system directory.
    pub elsewhere: Option<PathBuf>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.elsewhere, self.package) {
            (Some(at), _) => write!(
                f,
                "{} not found on PATH (it is at {}: add {} to the PATH, or configure the full path)",
                self.program,
                at.display(),
                at.parent().unwrap_or(Path::new("/")).display()
            ),
            (None, Some(p)) => write!(f, "{} not found: install {p}", self.program),
            (None, None) => write!(
                f,
                "{} not found: install it or configure its full path",
                self.program
            ),
        }
    }
}

impl std::error::Error for Missing {}

/// Every missing program of a list, as one message (`a; b`).
pub fn describe(missing: &[Missing]) -> String {
    missing
        .iter()
        .map(Missing::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn search(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| executable(p))
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

fn missing(program: &str, elsewhere: Option<PathBuf>) -> Missing {
    Missing {
        program: program.to_string(),
        package: package_of(program),
        elsewhere,
    }
}

/// Where `program` runs from: itself if it has a slash, else the first
/// executable match on `PATH`.
pub fn find(program: &str) -> Result<PathBuf, Missing> {
    if program.contains('/') {
        return if executable(Path::new(program)) {
            Ok(PathBuf::from(program))
        } else {
            Err(missing(program, None))
        };
    }
    if program.is_empty() {
        return Err(missing(program, None));
    }
    search(program, path_dirs()).ok_or_else(|| {
        let elsewhere = search(program, SBIN_DIRS.iter().map(PathBuf::from));
        missing(program, elsewhere)
    })
}

/// Like [`find`] for a program run through a privileged prefix (`sudo -n`),
/// which looks in the system directories too.
pub fn find_privileged(program: &str) -> Result<PathBuf, Missing> {
    find(program).or_else(|m| {
        if program.contains('/') {
            return Err(m);
        }
        search(program, SYSTEM_DIRS.iter().map(PathBuf::from)).ok_or(Missing {
            elsewhere: None,
            ..m
        })
    })
}

/// The [`Missing`] behind a failed spawn of `program`, if that is why it
/// failed (not found, or not executable); `None` for other causes (e.g. a
/// working directory that does not exist, which is also `NotFound`).
pub fn spawn_error(program: &str, e: &std::io::Error) -> Option<Missing> {
    let maybe = matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
    );
    if maybe {
        find(program).err()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_a_package_for_every_tool_the_kvm_driver_runs_by_default() {
        let k = crate::hypervisor::kvm::KvmConfig::default();
        for p in [
            &k.qemu,
            &k.qemu_img,
            &k.mkfs_vfat,
            &k.mcopy,
            &k.ip,
            &k.nft,
            &k.dnsmasq,
        ] {
            assert!(package_of(p).is_some(), "{p} has no package in tools.txt");
        }
        assert_eq!(package_of("/usr/bin/qemu-img"), Some("qemu-utils"));
        assert_eq!(package_of("xl"), Some("xen-utils-4.17"));
        assert!(table().all(|t| !t.needed_by.is_empty()));
        assert!(table().count() > 20);
    }

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let m = find("qemu-img-that-is-not-there").unwrap_err();
        assert_eq!(
            m.to_string(),
            "qemu-img-that-is-not-there not found: install it or configure its full path"
        );
        let m = missing("qemu-img", None);
        assert_eq!(m.to_string(), "qemu-img not found: install qemu-utils");
        let m = find("/nonexistent/bin/qemu-img").unwrap_err();
        assert_eq!(
            m.to_string(),
            "/nonexistent/bin/qemu-img not found: install qemu-utils"
        );
        let m = missing("nft", Some(PathBuf::from("/usr/sbin/nft")));
        assert!(m.to_string().contains("add /usr/sbin to the PATH"), "{m}");
    }

    #[test]
    fn programs_on_path_are_found_and_spawn_errors_map_only_when_the_program_is_missing() {
        assert!(find("sh").is_ok());
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(spawn_error("sh", &nf).is_none(), "sh exists: another cause");
        let m = spawn_error("mcopy-missing", &nf).unwrap();
        assert_eq!(m.program, "mcopy-missing");
        let other = std::io::Error::from(std::io::ErrorKind::Interrupted);
        assert!(spawn_error("mcopy-missing", &other).is_none());
    }
}
