//! The xenstored stand-in: a tree of nodes served on a unix socket, one
//! thread per connection, with a simulated dom0 balloon.
//!
//! Writing `/local/domain/0/memory/target` (KiB) starts the balloon: dom0's
//! `memory/current` (KiB, the stand-in's equivalent of the balloon driver's
//! `current_kb`) moves linearly to the target over `balloon-delay-ms`, never
//! below `balloon-floor-kb` and never into memory the guests hold. Both knobs
//! live under [`crate::TOOL_ROOT`] and may be rewritten while it runs.
//! Transactions are accepted but not isolated (the driver does not use them).

use crate::wire::{self, Msg};
use crate::TOOL_ROOT;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub const DOM0: &str = "/local/domain/0";
pub const DOM0_TARGET: &str = "/local/domain/0/memory/target";
pub const DOM0_CURRENT: &str = "/local/domain/0/memory/current";
pub const DOM0_STATIC_MAX: &str = "/local/domain/0/memory/static-max";

/// The node the stand-in starts with.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Physical memory, MB.
    pub total_mb: u64,
    /// dom0's memory at start, MB.
    pub dom0_mb: u64,
    /// dom0's static max, MB.
    pub max_mb: u64,
    pub cpus: u32,
    pub balloon_delay_ms: u64,
    pub balloon_floor_mb: Option<u64>,
    /// Dump the tree as JSON here after every change.
    pub state_json: Option<PathBuf>,
}

struct Balloon {
    from_kb: u64,
    set_at: Instant,
}

struct Watch {
    path: String,
    token: String,
    conn: Arc<Mutex<UnixStream>>,
    conn_id: u64,
}

/// The store: nodes by path (parents exist, with empty values).
pub struct Store {
    nodes: BTreeMap<String, String>,
    balloon: Balloon,
    watches: Vec<Watch>,
    next_tx: u32,
    state_json: Option<PathBuf>,
}

fn parent(path: &str) -> Option<&str> {
    match path.rfind('/') {
        Some(0) if path.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&path[..i]),
    }
}

fn kb(mb: u64) -> String {
    (mb * 1024).to_string()
}

impl Store {
    pub fn new(spec: &NodeSpec) -> Self {
        let mut s = Self {
            nodes: BTreeMap::new(),
            balloon: Balloon {
                from_kb: spec.dom0_mb * 1024,
                set_at: Instant::now(),
            },
            watches: Vec::new(),
            next_tx: 1,
            state_json: spec.state_json.clone(),
        };
        s.put("/", "");
        s.put(&format!("{DOM0}/name"), "Domain-0");
        s.put(&format!("{DOM0}/domid"), "0");
        s.put(DOM0_TARGET, &kb(spec.dom0_mb));
        s.put(DOM0_STATIC_MAX, &kb(spec.max_mb));
        for c in 0..spec.cpus {
            s.put(&format!("{DOM0}/cpu/{c}/availability"), "online");
        }
        s.put(&format!("{TOOL_ROOT}/total-kb"), &kb(spec.total_mb));
        s.put(&format!("{TOOL_ROOT}/nr-cpus"), &spec.cpus.to_string());
        s.put(
            &format!("{TOOL_ROOT}/balloon-delay-ms"),
            &spec.balloon_delay_ms.to_string(),
        );
        if let Some(f) = spec.balloon_floor_mb {
            s.put(&format!("{TOOL_ROOT}/balloon-floor-kb"), &kb(f));
        }
        s.put(&format!("{TOOL_ROOT}/next-domid"), "1");
        s
    }

    fn put(&mut self, path: &str, value: &str) {
        let mut p = parent(path);
        while let Some(dir) = p {
            self.nodes.entry(dir.to_string()).or_default();
            p = parent(dir);
        }
        self.nodes.insert(path.to_string(), value.to_string());
    }

    fn num(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).and_then(|v| v.trim().parse().ok())
    }

    fn guests_kb(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|(k, _)| {
                k.starts_with("/local/domain/")
                    && k.ends_with("/memory/target")
                    && k.as_str() != DOM0_TARGET
                    && k.matches('/').count() == 5
            })
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }

    /// dom0's memory now, KiB, under the balloon model.
    pub fn dom0_current_kb(&self) -> u64 {
        let from = self.balloon.from_kb;
        let target = self.num(DOM0_TARGET).unwrap_or(from);
        let goal = if target < from {
            let floor = self
                .num(&format!("{TOOL_ROOT}/balloon-floor-kb"))
                .unwrap_or(0);
            target.max(floor).min(from)
        } else {
            let total = self
                .num(&format!("{TOOL_ROOT}/total-kb"))
                .unwrap_or(u64::MAX);
            target.min(total.saturating_sub(self.guests_kb())).max(from)
        };
        let span = self
            .num(&format!("{TOOL_ROOT}/balloon-delay-ms"))
            .unwrap_or(0) as u128;
        let elapsed = self.balloon.set_at.elapsed().as_millis();
        if span == 0 || elapsed >= span {
            return goal;
        }
        let part = |d: u64| (d as u128 * elapsed / span) as u64;
        if goal >= from {
            from + part(goal - from)
        } else {
            from - part(from - goal)
        }
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, &'static str> {
        if path == DOM0_CURRENT {
            return Ok(self.dom0_current_kb().to_string().into_bytes());
        }
        self.nodes
            .get(path)
            .map(|v| v.as_bytes().to_vec())
            .ok_or("ENOENT")
    }

    fn directory(&self, path: &str) -> Result<Vec<String>, &'static str> {
        if !self.nodes.contains_key(path) {
            return Err("ENOENT");
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        let mut out: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/') && k.len() > prefix.len())
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect();
        if path == "/local/domain/0/memory" {
            out.push("current".into());
            out.sort();
        }
        Ok(out)
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), &'static str> {
        if !path.starts_with('/') || path.contains("//") {
            return Err("EINVAL");
        }
        if path == DOM0_CURRENT {
            return Err("EACCES");
        }
        if path == DOM0_TARGET {
            let new: u64 = value.trim().parse().map_err(|_| "EINVAL")?;
            let max = self.num(DOM0_STATIC_MAX).unwrap_or(u64::MAX);
            if new > max {
                return Err("EINVAL");
            }
            self.balloon = Balloon {
                from_kb: self.dom0_current_kb(),
                set_at: Instant::now(),
            };
        }
        self.put(path, value);
        self.fire(path);
        Ok(())
    }

    fn rm(&mut self, path: &str) -> Result<(), &'static str> {
        if !self.nodes.contains_key(path) {
            return Err("ENOENT");
        }
        let prefix = format!("{path}/");
        self.nodes
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        self.fire(path);
        Ok(())
    }

    /// Sends a watch event to every watch on `path` or one of its parents.
    fn fire(&mut self, path: &str) {
        self.watches.retain(|w| {
            let hit = path == w.path || path.starts_with(&format!("{}/", w.path));
            if !hit {
                return true;
            }
            let m = Msg::new(
                wire::XS_WATCH_EVENT,
                0,
                0,
                wire::nul_list(&[path, w.token.as_str()]),
            );
            match w.conn.lock() {
                Ok(mut s) => m.write_to(&mut *s).is_ok(),
                Err(_) => false,
            }
        });
        self.dump();
    }

    /// The tree as JSON (dom0's current memory included).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m: serde_json::Map<String, serde_json::Value> = self
            .nodes
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        m.insert(
            DOM0_CURRENT.to_string(),
            serde_json::Value::String(self.dom0_current_kb().to_string()),
        );
        serde_json::Value::Object(m)
    }

    fn dump(&self) {
        let Some(path) = &self.state_json else { return };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.to_json()).unwrap_or_default();
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one request.
fn handle(store: &Mutex<Store>, conn: &Arc<Mutex<UnixStream>>, conn_id: u64, m: &Msg) -> Msg {
    let args = m.strings();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let ok = || b"OK\0".to_vec();
    let result: Result<Vec<u8>, &'static str> = match m.ty {
        wire::XS_READ => lock(store).read(&arg(0)),
        wire::XS_DIRECTORY => lock(store).directory(&arg(0)).map(|l| wire::nul_list(&l)),
        wire::XS_WRITE => {
            // "path\0value": the value is everything after the first NUL.
            let p = &m.payload;
            match p.iter().position(|b| *b == 0) {
                Some(i) => {
                    let path = String::from_utf8_lossy(&p[..i]).into_owned();
                    let value = String::from_utf8_lossy(&p[i + 1..]).into_owned();
                    lock(store).write(&path, &value).map(|_| ok())
                }
                None => Err("EINVAL"),
            }
        }
        wire::XS_MKDIR => {
            let mut s = lock(store);
            let path = arg(0);
            if s.nodes.contains_key(&path) {
                Ok(ok())
            } else {
                s.write(&path, "").map(|_| ok())
            }
        }
        wire::XS_RM => lock(store).rm(&arg(0)).map(|_| ok()),
        wire::XS_WATCH => {
            let mut s = lock(store);
            s.watches.push(Watch {
                path: arg(0),
                token: arg(1),
                conn: Arc::clone(conn),
                conn_id,
            });
            Ok(ok())
        }
        wire::XS_UNWATCH => {
            let mut s = lock(store);
            let (path, token) = (arg(0), arg(1));
            s.watches
                .retain(|w| !(w.conn_id == conn_id && w.path == path && w.token == token));
            Ok(ok())
        }
        wire::XS_TRANSACTION_START => {
            let mut s = lock(store);
            let id = s.next_tx;
            s.next_tx = s.next_tx.wrapping_add(1).max(1);
            Ok(wire::nul_list(&[id.to_string()]))
        }
        wire::XS_TRANSACTION_END => Ok(ok()),
        wire::XS_GET_DOMAIN_PATH => Ok(wire::nul_list(&[format!("/local/domain/{}", arg(0))])),
        _ => Err("ENOSYS"),
    };
    match result {
        Ok(payload) => Msg::new(m.ty, m.req_id, m.tx_id, payload),
        Err(errno) => Msg::new(wire::XS_ERROR, m.req_id, m.tx_id, wire::nul_list(&[errno])),
    }
}

fn serve_conn(store: Arc<Mutex<Store>>, stream: UnixStream, conn_id: u64) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let writer = Arc::new(Mutex::new(stream));
    loop {
        let m = match Msg::read_from(&mut reader) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        let reply = handle(&store, &writer, conn_id, &m);
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        reply.write_to(&mut *w)?;
        // Xen fires a watch once when it is registered.
        if m.ty == wire::XS_WATCH && reply.ty == wire::XS_WATCH {
            let a = m.strings();
            let ev = Msg::new(wire::XS_WATCH_EVENT, 0, 0, wire::nul_list(&a));
            ev.write_to(&mut *w)?;
        }
    }
    lock(&store).watches.retain(|w| w.conn_id != conn_id);
    Ok(())
}

/// Serves `spec` on `socket` until the process ends (replaces a stale socket file).
pub fn serve(socket: &Path, spec: &NodeSpec) -> io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let store = Arc::new(Mutex::new(Store::new(spec)));
    lock(&store).dump();
    for (n, stream) in listener.incoming().enumerate() {
        let stream = stream?;
        let store = Arc::clone(&store);
        let id = n as u64 + 1;
        std::thread::spawn(move || {
            let _ = serve_conn(store, stream, id);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeSpec {
        NodeSpec {
            total_mb: 4096,
            dom0_mb: 4096,
            max_mb: 4096,
            cpus: 2,
            balloon_delay_ms: 0,
            balloon_floor_mb: None,
            state_json: None,
        }
    }

    #[test]
    fn directory_lists_children_and_current_appears_under_dom0_memory() {
        let s = Store::new(&spec());
        assert_eq!(
            s.directory("/local/domain/0/memory").unwrap(),
            vec!["current", "static-max", "target"]
        );
        assert_eq!(s.directory("/local/domain").unwrap(), vec!["0"]);
        assert_eq!(s.directory("/nope"), Err("ENOENT"));
    }

    #[test]
    fn balloon_stops_at_its_floor_and_cannot_grow_into_guests() {
        let mut sp = spec();
        sp.balloon_floor_mb = Some(3000);
        let mut s = Store::new(&sp);
        s.write(DOM0_TARGET, &kb(2048)).unwrap();
        assert_eq!(s.dom0_current_kb(), 3000 * 1024);
        s.write("/local/domain/1/memory/target", &kb(1024)).unwrap();
        s.write(DOM0_TARGET, &kb(4096)).unwrap();
        assert_eq!(s.dom0_current_kb(), 3072 * 1024);
        assert_eq!(s.write(DOM0_TARGET, &kb(5000)), Err("EINVAL"));
    }

    #[test]
    fn rm_removes_a_whole_subtree() {
        let mut s = Store::new(&spec());
        s.write("/local/domain/3/name", "x").unwrap();
        s.write("/local/domain/3/memory/target", "1").unwrap();
        s.rm("/local/domain/3").unwrap();
        assert_eq!(s.directory("/local/domain").unwrap(), vec!["0"]);
    }
}
