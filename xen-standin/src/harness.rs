//! Test harness: a running stand-in xenstored plus the fake `xl` on a PATH
//! directory, one per simulated Xen node, killed when dropped.
//!
//! Uses only std and serde_json, so the pilot's own tests can include it
//! with `#[path]` (the pilot cannot depend on this crate: it depends on the pilot).
//! The binaries must be built first (`cargo build --workspace --bins`).

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A binary of this workspace, from the target directory of the running test.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// One simulated Xen node.
pub struct Standin {
    child: Option<Child>,
    args: Vec<String>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Holds `xl` (a symlink to wsp-fake-xl): put it first on PATH.
    pub bin_dir: PathBuf,
    pub image_dir: PathBuf,
    pub run_dir: PathBuf,
    pub xl_log: PathBuf,
}

impl Standin {
    /// Starts a stand-in in `dir` (created) with extra daemon flags
    /// (`--total-mb`, `--balloon-delay-ms`, `--balloon-floor-mb`, ...).
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let bin_dir = dir.join("bin");
        let image_dir = dir.join("images");
        for d in [dir, &bin_dir, &image_dir] {
            std::fs::create_dir_all(d).expect("create stand-in dirs");
        }
        let xl = bin_dir.join("xl");
        if !xl.exists() {
            std::os::unix::fs::symlink(target_bin("wsp-fake-xl"), &xl).expect("symlink xl");
        }
        std::fs::write(image_dir.join("debian.qcow2"), b"disk").expect("image");
        let mut s = Self {
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            socket: dir.join("xenstored.sock"),
            run_dir: dir.join("run"),
            xl_log: dir.join("xl.log"),
            dir: dir.to_path_buf(),
            bin_dir,
            image_dir,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let child = Command::new(target_bin("wsp-xenstored-standin"))
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start wsp-xenstored-standin");
        self.child = Some(child);
        let start = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "stand-in did not listen on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills the daemon (its state is lost), as a crashed xenstored.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts a fresh daemon on the same socket.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// PATH with the fake xl first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let mut paths = vec![self.bin_dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).expect("PATH")
    }

    /// The `[xen]` section a site would write for this node; `extra` lines
    /// are added and replace the defaults of the keys they set.
    pub fn node_config(&self, extra: &str) -> String {
        let defaults = [
            ("xl", "\"xl\"".to_string()),
            ("command_prefix", "[]".to_string()),
            ("xenstored_path", format!("\"{}\"", self.socket.display())),
            ("run_dir", format!("\"{}\"", self.run_dir.display())),
            ("image_dir", format!("\"{}\"", self.image_dir.display())),
            ("command_timeout_ms", "5000".to_string()),
            ("xenstore_timeout_ms", "1000".to_string()),
            ("verify_timeout_ms", "2000".to_string()),
        ];
        let set = |k: &str| {
            extra
                .lines()
                .any(|l| l.split('=').next().map(str::trim) == Some(k))
        };
        let mut out = String::from("[xen]\n");
        for (k, v) in defaults {
            if !set(k) {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out.push_str(extra);
        out.push('\n');
        out
    }

    /// Writes [`Self::node_config`] to `<dir>/node.toml` and returns its path.
    pub fn write_node_config(&self, extra: &str) -> PathBuf {
        let p = self.dir.join("node.toml");
        std::fs::write(&p, self.node_config(extra)).expect("node config");
        p
    }

    /// Runs the fake xl against this node (as `xl` on PATH).
    pub fn xl(&self, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("xl"))
            .args(args)
            .env("XENSTORED_PATH", &self.socket)
            .env("WSP_FAKE_XL_LOG", &self.xl_log)
            .output()
            .expect("run fake xl")
    }

    pub fn xl_ok(&self, args: &[&str]) -> String {
        let o = self.xl(args);
        assert!(
            o.status.success(),
            "xl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A xenstore node's value, read now.
    pub fn read(&self, path: &str) -> String {
        self.xl_ok(&["xenstore-read", path]).trim().to_string()
    }

    /// dom0's (current, target) in MB.
    pub fn dom0(&self) -> (u64, u64) {
        let mb = |p: &str| self.read(p).parse::<u64>().expect("KiB") / 1024;
        (
            mb("/local/domain/0/memory/current"),
            mb("/local/domain/0/memory/target"),
        )
    }

    /// Names of every guest (dom0 left out), sorted.
    pub fn guests(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.xl_ok(&["list", "-l"])).expect("xl list -l JSON");
        let mut names: Vec<String> = v
            .as_array()
            .expect("array")
            .iter()
            .filter(|d| d["domid"].as_u64() != Some(0))
            .filter_map(|d| d["config"]["c_info"]["name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Creates a guest that is not the pilot's, through xl.
    pub fn add_guest(&self, name: &str, memory_mb: u64) {
        let cfg = self.dir.join(format!("{name}.cfg"));
        std::fs::write(
            &cfg,
            format!("name = \"{name}\"\nmemory = {memory_mb}\nvcpus = 1\n"),
        )
        .expect("guest config");
        self.xl_ok(&["create", &cfg.to_string_lossy()]);
    }

    /// The argv lines the fake xl was called with.
    pub fn xl_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.xl_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
    }
}
