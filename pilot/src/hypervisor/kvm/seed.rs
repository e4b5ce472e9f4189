//! The cloud-init NoCloud seed of a VM: a small vfat image labelled
//! `cidata` with `meta-data`, `user-data`, `network-config` (cloud-init
//! reads these), plus `wsp-peers` and `wsp-context.json` (one line per
//! ensemble member, for images without cloud-init). Built without root by
//! `mkfs.vfat -C` and `mcopy` (dosfstools, mtools).
//!
//! user-data and network-config are written as JSON, which is YAML too, so
//! no value (an SSH key, a host name) ever needs YAML quoting.

use super::run_bounded;
use crate::hypervisor::HvError;
use protocol::pilot::VmLaunch;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The seed's files: (name, content).
pub fn files(vm: &VmLaunch) -> Vec<(&'static str, String)> {
    let hostname = vm.hostname.clone().unwrap_or_else(|| vm.name.clone());
    let meta = format!("instance-id: {}\nlocal-hostname: {hostname}\n", vm.name);
    let ctx = vm.context.as_ref();
    let peers = ctx.map(|c| c.peers.clone()).unwrap_or_default();
    let hosts: String = peers
        .iter()
        .filter_map(|p| p.ips.first().map(|ip| format!("{ip} {}\n", p.name)))
        .collect();
    let peer_lines: String = peers
        .iter()
        .map(|p| {
            let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
            format!("{} {} {}\n", p.name, p.group, ips.join(","))
        })
        .collect();
    let mut user = json!({
        "hostname": hostname,
        "manage_etc_hosts": false,
        "write_files": [
            {"path": "/etc/wsp/peers", "content": peer_lines, "permissions": "0644"},
            {"path": "/etc/hosts", "content": hosts, "append": true},
        ],
    });
    if let Some(k) = ctx.and_then(|c| c.ssh_key.as_ref()) {
        user["ssh_authorized_keys"] = json!([k]);
    }
    let mut eth = serde_json::Map::new();
    for (i, n) in vm.nics.iter().enumerate() {
        eth.insert(
            format!("eth{i}"),
            json!({"match": {"macaddress": n.mac}, "set-name": format!("eth{i}"), "dhcp4": true}),
        );
    }
    let netcfg = json!({"version": 2, "ethernets": eth});
    let context = json!({
        "name": vm.name,
        "hostname": hostname,
        "nics": vm.nics,
        "context": vm.context,
    });
    vec![
        ("meta-data", meta),
        ("user-data", format!("#cloud-config\n{user:#}\n")),
        ("network-config", format!("{netcfg:#}\n")),
        ("wsp-peers", peer_lines),
        ("wsp-context.json", format!("{context:#}\n")),
    ]
}

/// Writes the seed image `out` (1 MiB FAT12, label `cidata`).
pub fn build(
    vm: &VmLaunch,
    out: &Path,
    mkfs_vfat: &str,
    mcopy: &str,
    timeout: Duration,
) -> Result<(), HvError> {
    let dir = out.with_extension("seed.d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| HvError::Io {
        path: dir.clone(),
        source,
    })?;
    let result = (|| {
        let mut names = Vec::new();
        for (name, text) in files(vm) {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|source| HvError::Io {
                path: p.clone(),
                source,
            })?;
            names.push(p);
        }
        let _ = std::fs::remove_file(out);
        let mut c = Command::new(mkfs_vfat);
        c.args(["-C", "-n", "cidata"]).arg(out).arg("1024");
        run_bounded(
            c,
            None,
            timeout,
            &format!("{mkfs_vfat} -C -n cidata {} 1024", out.display()),
        )?;
        let mut c = Command::new(mcopy);
        c.arg("-o").arg("-i").arg(out).args(&names).arg("::");
        run_bounded(
            c,
            None,
            timeout,
            &format!("{mcopy} -o -i {} ... ::", out.display()),
        )?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pilot::{Context, Nic, Peer};
    use protocol::VmId;

    #[test]
    fn seed_files_name_the_vm_its_peers_and_the_key() {
        let mut vm = VmLaunch::basic(VmId::generate(), "wsp-x".into(), 64, 1, "kernel:".into());
        vm.hostname = Some("head-0".into());
        vm.nics = vec![Nic {
            mac: "02:00:00:00:00:01".into(),
            ip: "10.77.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
            pool: "private".into(),
        }];
        vm.context = Some(Context {
            workspace_id: "ws-1".into(),
            workspace_name: "w".into(),
            group: "head".into(),
            peers: vec![Peer {
                name: "head-0".into(),
                group: "head".into(),
                ips: vec!["10.77.0.2".parse().unwrap()],
            }],
            ssh_key: Some("ssh-ed25519 AAAA \"quoted\" me".into()),
        });
        let f: std::collections::HashMap<_, _> = files(&vm).into_iter().collect();
        assert!(f["meta-data"].contains("local-hostname: head-0"));
        assert_eq!(f["wsp-peers"], "head-0 head 10.77.0.2\n");
        let user: serde_json::Value =
            serde_json::from_str(f["user-data"].trim_start_matches("#cloud-config\n")).unwrap();
        assert_eq!(
            user["ssh_authorized_keys"][0],
            "ssh-ed25519 AAAA \"quoted\" me"
        );
        assert!(f["network-config"].contains("02:00:00:00:00:01"));
    }
}
