//! `wsp-fake-xl`: a fake `xl` that answers from the xenstored stand-in.
//!
//! Tests put it on PATH as `xl` (a symlink). It talks to `$XENSTORED_PATH`
//! like the driver does, keeps guests under `/local/domain/<id>` as libxl
//! does and its own bookkeeping under `/tool/standin`. Subcommands: list
//! [-l] [dom], create FILE, destroy, mem-set, pause, unpause, save [-c|-p]
//! DOM FILE, restore [-p] [CONFIG] FILE, sched-credit, info (and
//! xenstore-read/-write for tests).
//! Each guest has a boot id (random at create) and a count that goes up
//! ten times a second while it is not paused (`list -l` shows both under
//! `standin`): save files carry them, so a restored guest is the same one
//! and counts on from where it stopped. A save file is one JSON line and a
//! filler of 1 KiB per MB of the guest's memory; restore refuses a file
//! whose filler is not whole.
//! `WSP_FAKE_XL_LOG=<file>` appends each argv there; `WSP_FAKE_XL_DESTROY_MS`
//! makes each destroy take that long.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use xen_standin::client::{XsClient, XsError};
use xen_standin::TOOL_ROOT;

type R<T> = Result<T, String>;

fn xs_err(e: XsError) -> String {
    e.to_string()
}

struct Dom {
    id: u32,
    name: String,
    mem_kb: u64,
    vcpus: u32,
    state: String,
    weight: u32,
    cap: u32,
    boot_id: String,
    count: u64,
}

/// Milliseconds per count of a running guest.
const COUNT_MS: u64 = 100;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A guest's identity and where its count stands.
struct Guest {
    boot_id: String,
    count: u64,
}

fn new_boot_id() -> R<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().replace('-', ""))
        .map_err(|e| format!("/proc/sys/kernel/random/uuid: {e}"))
}

fn num(xs: &mut XsClient, path: &str) -> R<u64> {
    let v = xs.read(path).map_err(xs_err)?;
    v.trim()
        .parse()
        .map_err(|_| format!("{path} = {v:?} is not a number"))
}

fn domains(xs: &mut XsClient) -> R<Vec<Dom>> {
    let mut out = Vec::new();
    for id in xs.directory("/local/domain").map_err(xs_err)? {
        let Ok(idn) = id.parse::<u32>() else { continue };
        let base = format!("/local/domain/{id}");
        let Some(name) = xs.read_opt(&format!("{base}/name")).map_err(xs_err)? else {
            continue;
        };
        let mem_path = if idn == 0 {
            "/local/domain/0/memory/current".to_string()
        } else {
            format!("{base}/memory/target")
        };
        // A guest another xl is tearing down loses its nodes one by one: skip it.
        let Some(mem) = xs.read_opt(&mem_path).map_err(xs_err)? else {
            continue;
        };
        let mem_kb: u64 = mem
            .trim()
            .parse()
            .map_err(|_| format!("{mem_path} = {mem:?} is not a number"))?;
        let vcpus = match xs.directory(&format!("{base}/cpu")) {
            Ok(c) => c.len() as u32,
            Err(e) if e.is_enoent() => 0,
            Err(e) => return Err(xs_err(e)),
        };
        let tool = format!("{TOOL_ROOT}/domain/{id}");
        let get = |xs: &mut XsClient, k: &str, d: &str| -> R<String> {
            Ok(xs
                .read_opt(&format!("{tool}/{k}"))
                .map_err(xs_err)?
                .unwrap_or_else(|| d.to_string()))
        };
        let base: u64 = get(xs, "count-base", "0")?.parse().unwrap_or(0);
        let since: Option<u64> = get(xs, "run-since-ms", "")?.parse().ok();
        out.push(Dom {
            id: idn,
            name,
            mem_kb,
            vcpus,
            state: get(xs, "state", "running")?,
            weight: get(xs, "weight", "256")?.parse().unwrap_or(256),
            cap: get(xs, "cap", "0")?.parse().unwrap_or(0),
            boot_id: get(xs, "boot-id", "")?,
            count: base + since.map_or(0, |s| now_ms().saturating_sub(s) / COUNT_MS),
        });
    }
    out.sort_by_key(|d| d.id);
    Ok(out)
}

fn find(xs: &mut XsClient, which: &str) -> R<Dom> {
    domains(xs)?
        .into_iter()
        .find(|d| d.name == which || d.id.to_string() == which)
        .ok_or_else(|| format!("Invalid domain identifier: {which}"))
}

/// Serializes the fake toolstack's read-modify-write steps across processes.
struct ToolLock(std::fs::File);

fn tool_lock() -> R<ToolLock> {
    let sock = std::env::var_os("XENSTORED_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/xenstored/socket"));
    let path = PathBuf::from(format!("{}.xl-lock", sock.display()));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let start = Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(ToolLock(f)),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

impl Drop for ToolLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Parses the subset of xl's config syntax the driver writes.
fn parse_config(text: &str) -> R<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("config line {}: no '=': {line}", n + 1))?;
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Value::Array(
                inner
                    .split("\",")
                    .map(|s| Value::String(s.trim().trim_matches('"').to_string()))
                    .filter(|s| s.as_str() != Some(""))
                    .collect(),
            )
        } else if let Some(s) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Value::String(s.to_string())
        } else if let Ok(i) = v.parse::<u64>() {
            json!(i)
        } else {
            return Err(format!("config line {}: bad value: {v}", n + 1));
        };
        out.insert(k.trim().to_string(), value);
    }
    Ok(out)
}

/// Pauses or unpauses a guest, freezing or restarting its count.
fn set_paused(xs: &mut XsClient, d: &Dom, paused: bool) -> R<()> {
    let tool = format!("{TOOL_ROOT}/domain/{}", d.id);
    xs.write(&format!("{tool}/count-base"), &d.count.to_string())
        .map_err(xs_err)?;
    let since = if paused {
        String::new()
    } else {
        now_ms().to_string()
    };
    xs.write(&format!("{tool}/run-since-ms"), &since)
        .map_err(xs_err)?;
    xs.write(
        &format!("{tool}/state"),
        if paused { "paused" } else { "running" },
    )
    .map_err(xs_err)
}

/// Makes a guest: checks name and free memory like libxl, writes its nodes.
/// `guest` is the identity a restore carries (a new one otherwise).
fn make_domain(
    xs: &mut XsClient,
    name: &str,
    mem_mb: u64,
    vcpus: u32,
    origin: &str,
    guest: Option<Guest>,
    paused: bool,
) -> R<u32> {
    let _lock = tool_lock()?;
    let doms = domains(xs)?;
    if doms.iter().any(|d| d.name == name) {
        return Err(format!("domain with name \"{name}\" already exists."));
    }
    let total = num(xs, &format!("{TOOL_ROOT}/total-kb"))?;
    let used: u64 = doms.iter().map(|d| d.mem_kb).sum();
    let need = mem_mb * 1024;
    if total.saturating_sub(used) < need {
        return Err(format!(
            "failed to free memory for the domain: need {need} KiB, free {} KiB",
            total.saturating_sub(used)
        ));
    }
    let id = num(xs, &format!("{TOOL_ROOT}/next-domid"))? as u32;
    xs.write(&format!("{TOOL_ROOT}/next-domid"), &(id + 1).to_string())
        .map_err(xs_err)?;
    let base = format!("/local/domain/{id}");
    let tool = format!("{TOOL_ROOT}/domain/{id}");
    let guest = match guest {
        Some(g) => g,
        None => Guest {
            boot_id: new_boot_id()?,
            count: 0,
        },
    };
    xs.write(
        &format!("{tool}/state"),
        if paused { "paused" } else { "running" },
    )
    .map_err(xs_err)?;
    xs.write(&format!("{tool}/origin"), origin)
        .map_err(xs_err)?;
    xs.write(&format!("{tool}/boot-id"), &guest.boot_id)
        .map_err(xs_err)?;
    xs.write(&format!("{tool}/count-base"), &guest.count.to_string())
        .map_err(xs_err)?;
    let since = if paused {
        String::new()
    } else {
        now_ms().to_string()
    };
    xs.write(&format!("{tool}/run-since-ms"), &since)
        .map_err(xs_err)?;
    xs.write(&format!("{base}/domid"), &id.to_string())
        .map_err(xs_err)?;
    xs.write(&format!("{base}/memory/static-max"), &need.to_string())
        .map_err(xs_err)?;
    for c in 0..vcpus {
        xs.write(&format!("{base}/cpu/{c}/availability"), "online")
            .map_err(xs_err)?;
    }
    xs.write(&format!("{base}/memory/target"), &need.to_string())
        .map_err(xs_err)?;
    // The name last: a guest is listed once it is complete.
    xs.write(&format!("{base}/name"), name).map_err(xs_err)?;
    Ok(id)
}

fn remove_domain(xs: &mut XsClient, d: &Dom) -> R<()> {
    if d.id == 0 {
        return Err("cannot destroy privileged domain 0".into());
    }
    // The name first: the guest leaves listings at once, as with libxl.
    xs.rm(&format!("/local/domain/{}/name", d.id))
        .map_err(xs_err)?;
    xs.rm(&format!("/local/domain/{}", d.id)).map_err(xs_err)?;
    match xs.rm(&format!("{TOOL_ROOT}/domain/{}", d.id)) {
        Ok(()) => Ok(()),
        Err(e) if e.is_enoent() => Ok(()),
        Err(e) => Err(xs_err(e)),
    }
}

/// `4096m`, `4g`, `4194304k`, or KiB without a suffix (as xl), to MB.
fn parse_mem_mb(s: &str) -> R<u64> {
    let (n, mult_kb) = match s.chars().last() {
        Some('b') | Some('B') => (&s[..s.len() - 1], 0),
        Some('k') | Some('K') => (&s[..s.len() - 1], 1),
        Some('m') | Some('M') => (&s[..s.len() - 1], 1024),
        Some('g') | Some('G') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    let v: u64 = n.parse().map_err(|_| format!("invalid memory size: {s}"))?;
    Ok(if mult_kb == 0 {
        v / (1024 * 1024)
    } else {
        v * mult_kb / 1024
    })
}

fn list(xs: &mut XsClient, args: &[String]) -> R<()> {
    let long = args.iter().any(|a| a == "-l" || a == "--long");
    let which: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut doms = domains(xs)?;
    if let Some(w) = which.first() {
        let d = find(xs, w)?;
        doms.retain(|x| x.id == d.id);
    }
    if long {
        let v: Vec<Value> = doms
            .iter()
            .map(|d| {
                json!({
                    "domid": d.id,
                    "config": {
                        "c_info": { "type": "pvh", "name": d.name },
                        "b_info": {
                            "max_vcpus": d.vcpus,
                            "max_memkb": d.mem_kb,
                            "target_memkb": d.mem_kb,
                            "sched_params": { "weight": d.weight, "cap": d.cap },
                        },
                    },
                    "state": d.state,
                    "standin": { "boot_id": d.boot_id, "count": d.count },
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!("Name                                        ID   Mem VCPUs\tState\tTime(s)");
        for d in doms {
            let st = if d.state == "paused" {
                "--p---"
            } else {
                "r-----"
            };
            println!(
                "{:<40} {:>5} {:>5} {:>5}     {}       0.0",
                d.name,
                d.id,
                d.mem_kb / 1024,
                d.vcpus,
                st
            );
        }
    }
    Ok(())
}

fn save_record(d: &Dom) -> Value {
    json!({
        "name": d.name,
        "memory_mb": d.mem_kb / 1024,
        "vcpus": d.vcpus,
        "boot_id": d.boot_id,
        "count": d.count,
    })
}

/// 1 KiB of the save file's filler.
fn filler_block() -> Vec<u8> {
    (0..1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

/// Splits `args` into flags (`-x`) and the rest, in order.
fn flags_and_rest(args: &[String]) -> (Vec<&str>, Vec<&String>) {
    let flags = args
        .iter()
        .filter(|a| a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let rest = args.iter().filter(|a| !a.starts_with('-')).collect();
    (flags, rest)
}

fn run(args: &[String]) -> R<()> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let rest = &args[args.len().min(1)..];
    let mut xs = XsClient::from_env(Duration::from_secs(5)).map_err(xs_err)?;
    let arg = |i: usize| -> R<&String> {
        rest.get(i)
            .ok_or_else(|| format!("xl {cmd}: missing argument {}", i + 1))
    };
    match cmd {
        "list" => list(&mut xs, rest),
        "create" => {
            let file = rest
                .iter()
                .find(|a| !a.starts_with('-'))
                .ok_or("xl create: no config file")?;
            let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            let cfg = parse_config(&text)?;
            let name = cfg
                .get("name")
                .and_then(Value::as_str)
                .ok_or("config has no name")?;
            let mem = cfg
                .get("memory")
                .and_then(Value::as_u64)
                .ok_or("config has no memory")?;
            let vcpus = cfg.get("vcpus").and_then(Value::as_u64).unwrap_or(1) as u32;
            if let Some(disks) = cfg.get("disk").and_then(Value::as_array) {
                for d in disks.iter().filter_map(Value::as_str) {
                    let target = d
                        .split(',')
                        .find_map(|p| p.trim().strip_prefix("target="))
                        .unwrap_or("");
                    if !Path::new(target).exists() {
                        return Err(format!("disk image {target} does not exist"));
                    }
                }
            }
            let id = make_domain(&mut xs, name, mem, vcpus, file, None, false)?;
            eprintln!("Parsing config from {file}");
            let _ = id;
            Ok(())
        }
        "destroy" => {
            let d = find(&mut xs, arg(0)?)?;
            // Models a guest taking time to die (tests of parallel destroy).
            if let Some(ms) = std::env::var("WSP_FAKE_XL_DESTROY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            remove_domain(&mut xs, &d)
        }
        "mem-set" => {
            let d = find(&mut xs, arg(0)?)?;
            let mb = parse_mem_mb(arg(1)?)?;
            xs.write(
                &format!("/local/domain/{}/memory/target", d.id),
                &(mb * 1024).to_string(),
            )
            .map_err(xs_err)
        }
        "pause" | "unpause" => {
            let d = find(&mut xs, arg(0)?)?;
            set_paused(&mut xs, &d, cmd == "pause")
        }
        "save" => {
            // save [-c|-p] <Domain> <CheckpointFile> [<ConfigFile>]
            let (flags, pos) = flags_and_rest(rest);
            let which = pos.first().ok_or("xl save: no domain")?;
            let file = pos.get(1).ok_or("xl save: no checkpoint file")?;
            let d = find(&mut xs, which)?;
            let mut text = serde_json::to_vec(&save_record(&d)).map_err(|e| e.to_string())?;
            text.push(b'\n');
            let block = filler_block();
            for _ in 0..d.mem_kb / 1024 {
                text.extend_from_slice(&block);
            }
            std::fs::write(file, text).map_err(|e| format!("{file}: {e}"))?;
            if flags.contains(&"-p") {
                set_paused(&mut xs, &d, true)
            } else if flags.contains(&"-c") {
                Ok(())
            } else {
                remove_domain(&mut xs, &d)
            }
        }
        "restore" => {
            // restore [-p] [<ConfigFile>] <CheckpointFile>
            let (flags, pos) = flags_and_rest(rest);
            let (config, file) = match pos.as_slice() {
                [file] => (None, *file),
                [config, file] => (Some(*config), *file),
                _ => return Err("xl restore: [-p] [<ConfigFile>] <CheckpointFile>".into()),
            };
            let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            let nl = bytes
                .iter()
                .position(|b| *b == b'\n')
                .unwrap_or(bytes.len());
            let v: Value =
                serde_json::from_slice(&bytes[..nl]).map_err(|e| format!("{file}: {e}"))?;
            let saved_mem = v["memory_mb"].as_u64().ok_or("save file has no memory")?;
            let filler = &bytes[(nl + 1).min(bytes.len())..];
            let block = filler_block();
            if filler.len() as u64 != saved_mem * 1024
                || filler.chunks(1024).any(|c| c != block.as_slice())
            {
                return Err(format!(
                    "{file}: damaged checkpoint (memory image does not match)"
                ));
            }
            let mut name = v["name"]
                .as_str()
                .ok_or("save file has no name")?
                .to_string();
            let mut vcpus = v["vcpus"].as_u64().unwrap_or(1) as u32;
            if let Some(cfg_file) = config {
                let text =
                    std::fs::read_to_string(cfg_file).map_err(|e| format!("{cfg_file}: {e}"))?;
                let cfg = parse_config(&text)?;
                name = cfg
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("config has no name")?
                    .to_string();
                let mem = cfg
                    .get("memory")
                    .and_then(Value::as_u64)
                    .unwrap_or(saved_mem);
                if mem != saved_mem {
                    return Err(format!(
                        "memory = {mem} in {cfg_file} differs from the saved domain's {saved_mem} MB"
                    ));
                }
                vcpus = cfg.get("vcpus").and_then(Value::as_u64).unwrap_or(1) as u32;
            }
            let guest = Guest {
                boot_id: v["boot_id"].as_str().unwrap_or_default().to_string(),
                count: v["count"].as_u64().unwrap_or(0),
            };
            make_domain(
                &mut xs,
                &name,
                saved_mem,
                vcpus,
                file,
                Some(guest),
                flags.contains(&"-p"),
            )
            .map(|_| ())
        }
        "sched-credit" => {
            let mut dom = None;
            let mut sets = Vec::new();
            let mut i = 0;
            while i < rest.len() {
                let flag = rest[i].as_str();
                let val = rest.get(i + 1).cloned().unwrap_or_default();
                match flag {
                    "-d" => dom = Some(val),
                    "-w" => sets.push(("weight", val)),
                    "-c" => sets.push(("cap", val)),
                    other => return Err(format!("xl sched-credit: unknown option {other}")),
                }
                i += 2;
            }
            let d = find(&mut xs, dom.as_deref().ok_or("xl sched-credit: -d needed")?)?;
            if sets.is_empty() {
                println!("Name                                ID Weight  Cap");
                println!("{:<32} {:>5} {:>6} {:>4}", d.name, d.id, d.weight, d.cap);
            }
            for (k, v) in sets {
                v.parse::<u32>()
                    .map_err(|_| format!("xl sched-credit: bad {k} {v:?}"))?;
                xs.write(&format!("{TOOL_ROOT}/domain/{}/{k}", d.id), &v)
                    .map_err(xs_err)?;
            }
            Ok(())
        }
        "info" => {
            let total = num(&mut xs, &format!("{TOOL_ROOT}/total-kb"))?;
            let used: u64 = domains(&mut xs)?.iter().map(|d| d.mem_kb).sum();
            let cpus = num(&mut xs, &format!("{TOOL_ROOT}/nr-cpus"))?;
            println!("host                   : standin");
            println!("nr_cpus                : {cpus}");
            println!("total_memory           : {}", total / 1024);
            println!(
                "free_memory            : {}",
                total.saturating_sub(used) / 1024
            );
            println!("xen_version            : 4.17-standin");
            Ok(())
        }
        // Not xl's: the stand-in's answer to xenstore-read / xenstore-write, for tests.
        "xenstore-read" => {
            println!("{}", xs.read(arg(0)?).map_err(xs_err)?);
            Ok(())
        }
        "xenstore-write" => xs.write(arg(0)?, arg(1)?).map_err(xs_err),
        other => Err(format!("xl: unknown subcommand {other:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(log) = std::env::var_os("WSP_FAKE_XL_LOG") {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
            // One write per line: calls run in parallel (kill-all destroys
            // so), and `writeln!` writes the text and its newline apart,
            // which lets two calls' lines run together.
            let _ = f.write_all(format!("{}\n", args.join(" ")).as_bytes());
        }
    }
    if let Err(e) = run(&args) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
