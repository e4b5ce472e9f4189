//! The node's image cache: VM images fetched once, verified, shared by every
//! pilot on the node, and evicted least recently used within a size bound.
//!
//! Layout under `[images] cache_dir`: `sha256/<hex>` (content-addressed, read
//! only), `by-url/<hex of the URL>` (which content a URL gave, for sources
//! without a checksum), `locks/<key>.lock` (flock per image), `tmp/` (partial
//! downloads, never used). A download goes to `tmp/`, is hashed while it is
//! written, verified, fsynced and renamed into place; two pilots that want
//! the same image take the same lock, so one downloads and the other finds
//! it. Not here: overlays (the driver makes them) and resolving names (the
//! coordinator sends a URL).

use nix::fcntl::{Flock, FlockArg};
use protocol::pilot::ImageSource;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// `[images]` of the node config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// Cache directory (`%n` = node name). Shared by the node's pilots.
    pub cache_dir: String,
    /// Size bound of the cache; least recently used images beyond it are
    /// removed (never one a VM or a staging pilot is using).
    pub max_bytes: u64,
    /// Bound on one download or copy.
    pub download_timeout_s: u64,
    /// Bound on waiting for another pilot's download of the same image.
    pub lock_timeout_s: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            cache_dir: "/var/cache/workspace-pilot/images".into(),
            max_bytes: 20 * 1024 * 1024 * 1024,
            download_timeout_s: 600,
            lock_timeout_s: 900,
        }
    }
}

/// Why an image could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {url}: checksum mismatch: expected sha256 {expected}, got {got} ({bytes} bytes); not cached")]
    ChecksumMismatch {
        url: String,
        expected: String,
        got: String,
        bytes: u64,
    },
    #[error("image {url}: download failed: {message}")]
    Download { url: String, message: String },
    #[error("image {url}: {what} did not finish within {after_ms} ms")]
    Timeout {
        url: String,
        what: &'static str,
        after_ms: u64,
    },
    #[error(
        "image {url}: unsupported source (expected http://, https://, file:// or an absolute path)"
    )]
    Unsupported { url: String },
    #[error("image {url}: sha256 {sha:?} is not 64 hex digits")]
    BadChecksum { url: String, sha: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 hex of some bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// An image ready for a VM. Holds a shared lock on it (eviction skips it)
/// until dropped: keep it until the VM has opened the file.
pub struct Staged {
    pub path: PathBuf,
    pub sha256: String,
    /// Already cached (no transfer).
    pub hit: bool,
    pub took: Duration,
    _hold: Flock<File>,
}

/// One node's image cache.
pub struct ImageCache {
    dir: PathBuf,
    cfg: ImagesConfig,
    http: reqwest::Client,
}

impl ImageCache {
    /// Opens (creating) the cache directory.
    pub fn open(cfg: &ImagesConfig, node: &str) -> Result<Self, ImageError> {
        let dir = crate::node::expand_node(&cfg.cache_dir, node);
        for sub in ["sha256", "by-url", "locks", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(cfg.download_timeout_s.max(1)))
            .build()
            .map_err(|e| ImageError::Download {
                url: String::new(),
                message: format!("http client: {e}"),
            })?;
        Ok(Self {
            dir,
            cfg: cfg.clone(),
            http,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the cached content with this digest.
    pub fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join("sha256").join(sha)
    }

    /// Digests of every cached image (what the pilot reports).
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.dir.join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| protocol::spec::is_sha256_hex(n))
            .collect();
        out.sort();
        out
    }

    async fn lock(&self, key: &str, arg: FlockArg, url: &str) -> Result<Flock<File>, ImageError> {
        let path = self.dir.join("locks").join(format!("{key}.lock"));
        let bound = Duration::from_secs(self.cfg.lock_timeout_s.max(1));
        let start = Instant::now();
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .open(&path)
                .map_err(io(&path))?;
            match Flock::lock(file, arg) {
                Ok(l) => return Ok(l),
                Err((_, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => {}
                Err((_, e)) => return Err(io(&path)(std::io::Error::from(e))),
            }
            if start.elapsed() >= bound {
                return Err(ImageError::Timeout {
                    url: url.to_string(),
                    what: "waiting for another pilot's download",
                    after_ms: start.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One non-blocking try of a lock: `None` when someone else holds it.
    fn try_lock(&self, key: &str, arg: FlockArg) -> Result<Option<Flock<File>>, ImageError> {
        let path = self.dir.join("locks").join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&path)
            .map_err(io(&path))?;
        match Flock::lock(file, arg) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => Ok(None),
            Err((_, e)) => Err(io(&path)(std::io::Error::from(e))),
        }
    }

    fn touch(path: &Path) {
        if let Ok(f) = File::options().write(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Puts the image into the cache (once per node, whoever asks first) and
    /// returns it held against eviction.
    pub async fn stage(&self, src: &ImageSource) -> Result<Staged, ImageError> {
        let t0 = Instant::now();
        let url = src.url.as_str();
        let expected = src.sha256.as_ref().map(|s| s.to_ascii_lowercase());
        if let Some(e) = &expected {
            if !protocol::spec::is_sha256_hex(e) {
                return Err(ImageError::BadChecksum {
                    url: url.into(),
                    sha: e.clone(),
                });
            }
        }
        // Fast path: already cached; a shared hold is all it takes (it waits
        // only while someone else downloads it).
        if let Some(e) = expected.as_ref().filter(|e| self.path_of(e).is_file()) {
            let hold = self.lock(e, FlockArg::LockSharedNonblock, url).await?;
            let path = self.path_of(e);
            if path.is_file() {
                Self::touch(&path);
                return Ok(Staged {
                    path,
                    sha256: e.clone(),
                    hit: true,
                    took: t0.elapsed(),
                    _hold: hold,
                });
            }
        }
        let url_key = format!("url-{}", sha256_hex(url.as_bytes()));
        let key = expected.clone().unwrap_or_else(|| url_key.clone());
        // Exclusive to download; but when another pilot has finished it and
        // holds it shared (its VM is starting), share it instead of waiting.
        let wait_end = Instant::now() + Duration::from_secs(self.cfg.lock_timeout_s.max(1));
        let guard = loop {
            if let Some(g) = self.try_lock(&key, FlockArg::LockExclusiveNonblock)? {
                break g;
            }
            if let Some(e) = expected.as_ref().filter(|e| self.path_of(e).is_file()) {
                if let Some(hold) = self.try_lock(e, FlockArg::LockSharedNonblock)? {
                    let path = self.path_of(e);
                    Self::touch(&path);
                    return Ok(Staged {
                        path,
                        sha256: e.clone(),
                        hit: true,
                        took: t0.elapsed(),
                        _hold: hold,
                    });
                }
            }
            if Instant::now() >= wait_end {
                return Err(ImageError::Timeout {
                    url: url.to_string(),
                    what: "waiting for another pilot's download",
                    after_ms: t0.elapsed().as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pointer = self.dir.join("by-url").join(&url_key);
        let known = match &expected {
            Some(e) => Some(e.clone()),
            None => std::fs::read_to_string(&pointer)
                .ok()
                .map(|t| t.trim().to_string()),
        };
        let (sha, hit) = match known.filter(|s| self.path_of(s).is_file()) {
            Some(s) => (s, true),
            None => (self.fetch(src, expected.as_deref()).await?, false),
        };
        if expected.is_none() {
            crate::files::write_durable(&pointer, format!("{sha}\n").as_bytes(), 0o644)
                .map_err(io(&pointer))?;
        }
        let path = self.path_of(&sha);
        Self::touch(&path);
        let hold = if key == sha {
            guard
                .relock(FlockArg::LockShared)
                .map_err(|e| io(&path)(std::io::Error::from(e)))?;
            guard
        } else {
            let h = self.lock(&sha, FlockArg::LockSharedNonblock, url).await?;
            drop(guard);
            h
        };
        let staged = Staged {
            path,
            sha256: sha,
            hit,
            took: t0.elapsed(),
            _hold: hold,
        };
        if let Err(e) = self.evict(&staged.sha256) {
            tracing::warn!(error = %e, "image cache eviction failed");
        }
        tracing::info!(url, sha256 = %staged.sha256, hit, took_ms = staged.took.as_millis() as u64, "image staged");
        Ok(staged)
    }

    /// Transfers `src` into `tmp/`, hashing as it goes, verifies, renames
    /// into `sha256/`. Returns the digest. The partial file is removed on
    /// every failure.
    async fn fetch(&self, src: &ImageSource, expected: Option<&str>) -> Result<String, ImageError> {
        let url = src.url.as_str();
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}.part",
            sha256_hex(url.as_bytes()),
            std::process::id()
        ));
        let bound = Duration::from_secs(self.cfg.download_timeout_s.max(1));
        let result = tokio::time::timeout(bound, self.transfer(url, &tmp))
            .await
            .unwrap_or_else(|_| {
                Err(ImageError::Timeout {
                    url: url.into(),
                    what: "the transfer",
                    after_ms: bound.as_millis() as u64,
                })
            });
        let (got, bytes) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Some(e) = expected {
            if e != got {
                let _ = std::fs::remove_file(&tmp);
                return Err(ImageError::ChecksumMismatch {
                    url: url.into(),
                    expected: e.into(),
                    got,
                    bytes,
                });
            }
        }
        let dest = self.path_of(&got);
        let done =
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .and_then(|_| std::fs::rename(&tmp, &dest));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&dest)(e));
        }
        tracing::info!(url, sha256 = %got, bytes, "image fetched into the cache");
        Ok(got)
    }

    async fn transfer(&self, url: &str, tmp: &Path) -> Result<(String, u64), ImageError> {
        let mut out = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io(tmp))?;
        let mut h = Sha256::new();
        let mut bytes = 0u64;
        if url.starts_with("http://") || url.starts_with("https://") {
            let dl = |m: String| ImageError::Download {
                url: url.into(),
                message: m,
            };
            let mut resp = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| dl(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(dl(format!("HTTP {}", resp.status())));
            }
            while let Some(chunk) = resp.chunk().await.map_err(|e| dl(e.to_string()))? {
                h.update(&chunk);
                out.write_all(&chunk).map_err(io(tmp))?;
                bytes += chunk.len() as u64;
            }
        } else {
            let path = match url.strip_prefix("file://") {
                Some(p) => PathBuf::from(p),
                None if url.starts_with('/') => PathBuf::from(url),
                None => return Err(ImageError::Unsupported { url: url.into() }),
            };
            let tmp2 = tmp.to_path_buf();
            let (sha, n, file) = tokio::task::spawn_blocking(move || {
                let mut f = File::open(&path).map_err(io(&path))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let k = f.read(&mut buf).map_err(io(&path))?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    out.write_all(&buf[..k]).map_err(io(&tmp2))?;
                    n += k as u64;
                }
                Ok::<_, ImageError>((hex(&h.finalize()), n, out))
            })
            .await
            .map_err(|e| ImageError::Download {
                url: url.into(),
                message: format!("copy task: {e}"),
            })??;
            file.sync_all().map_err(io(tmp))?;
            return Ok((sha, n));
        }
        out.sync_all().map_err(io(tmp))?;
        Ok((hex(&h.finalize()), bytes))
    }

    /// Removes least recently used images until the cache fits `max_bytes`.
    /// Never removes `keep`, an image whose lock another pilot holds (it is
    /// staging or has just staged it) or one a process has open (a VM's
    /// QEMU keeps its base image open). Returns the digests removed.
    pub fn evict(&self, keep: &str) -> Result<Vec<String>, ImageError> {
        let dir = self.dir.join("sha256");
        let mut entries: Vec<(String, u64, SystemTime)> = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(m) = e.metadata() {
                entries.push((
                    name,
                    m.len(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ));
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        if total <= self.cfg.max_bytes {
            return Ok(Vec::new());
        }
        entries.sort_by_key(|e| e.2);
        let open = open_files();
        let mut removed = Vec::new();
        for (name, size, _) in entries {
            if total <= self.cfg.max_bytes {
                break;
            }
            let path = dir.join(&name);
            if name == keep || open.contains(&path) {
                continue;
            }
            let lock_path = self.dir.join("locks").join(format!("{name}.lock"));
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
            else {
                continue;
            };
            let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(sha256 = %name, bytes = size, "image evicted from the cache");
                total = total.saturating_sub(size);
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Every file some process has open (by /proc/*/fd), for eviction.
fn open_files() -> std::collections::HashSet<PathBuf> {
    let mut out = std::collections::HashSet::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        for fd in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                out.insert(target);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path, max_bytes: u64) -> ImageCache {
        ImageCache::open(
            &ImagesConfig {
                cache_dir: dir.display().to_string(),
                max_bytes,
                download_timeout_s: 10,
                lock_timeout_s: 10,
            },
            "n1",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_file_image_is_cached_by_content_and_a_second_stage_is_a_hit() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("a.raw");
        std::fs::write(&img, b"disk").unwrap();
        let c = cache(&t.path().join("cache"), 1 << 20);
        let src = ImageSource {
            url: format!("file://{}", img.display()),
            sha256: Some(sha256_hex(b"disk")),
        };
        let s1 = c.stage(&src).await.unwrap();
        assert!(!s1.hit);
        assert_eq!(std::fs::read(&s1.path).unwrap(), b"disk");
        drop(s1);
        assert!(c.stage(&src).await.unwrap().hit);
        assert_eq!(c.list(), vec![sha256_hex(b"disk")]);
        // Without a checksum: cached by URL, then found again.
        let src = ImageSource {
            url: img.display().to_string(),
            sha256: None,
        };
        assert!(
            !c.stage(&src).await.unwrap().hit,
            "a new URL is transferred once"
        );
        assert!(c.stage(&src).await.unwrap().hit);
    }

    #[tokio::test]
    async fn a_checksum_mismatch_is_refused_and_nothing_is_cached() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("a.raw");
        std::fs::write(&img, b"corrupted").unwrap();
        let c = cache(&t.path().join("cache"), 1 << 20);
        let src = ImageSource {
            url: img.display().to_string(),
            sha256: Some(sha256_hex(b"disk")),
        };
        let e = c.stage(&src).await.err().unwrap();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(c.list().is_empty());
        assert_eq!(std::fs::read_dir(c.dir().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn eviction_removes_the_least_recently_used_and_spares_held_images() {
        let t = tempfile::tempdir().unwrap();
        let c = cache(&t.path().join("cache"), 10);
        let mut held = Vec::new();
        for (i, body) in [b"aaaaaa", b"bbbbbb", b"cccccc"].iter().enumerate() {
            let img = t.path().join(format!("{i}.raw"));
            std::fs::write(&img, body).unwrap();
            let s = c
                .stage(&ImageSource {
                    url: img.display().to_string(),
                    sha256: None,
                })
                .await
                .unwrap();
            if i == 0 {
                held.push(s); // in use: never evicted
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = c.list();
        assert!(left.contains(&sha256_hex(b"aaaaaa")), "{left:?}");
        assert!(left.contains(&sha256_hex(b"cccccc")), "{left:?}");
        assert!(!left.contains(&sha256_hex(b"bbbbbb")), "{left:?}");
    }
}
