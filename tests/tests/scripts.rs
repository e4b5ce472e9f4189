//! The project's shell scripts run with `set -o pipefail`. There, a pipeline
//! that ends in a reader that stops early (`grep -q`, `head`) fails at
//! random: the reader exits at its first match, the writer gets SIGPIPE
//! (exit 141) if it still had lines to write, and pipefail reports that as
//! the pipeline's status. `node_names | grep -qx pbsn1 || qmgr -c "delete
//! node pbsn1"` deleted a node we needed, one start in a few, that way.
//! Write `grep -q PATTERN <<<"$(command)"` or `sed -n 1p` instead.

use wsp_e2e::repo;

/// `(script, line number, line)` of every early-exit reader at the end of a
/// pipe (every script sets pipefail or is sourced by one; `sh -c '...'`
/// runs without it).
fn early_exit_pipes() -> Vec<(String, usize, String)> {
    let mut found = Vec::new();
    let dir = repo().join("scripts");
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)
        .expect("scripts/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    for path in scripts {
        let text = std::fs::read_to_string(&path).expect("a script");
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with('#') || code.contains("sh -c") {
                continue;
            }
            let bad = code.split('|').skip(1).any(|stage| {
                let words: Vec<&str> = stage.split_whitespace().collect();
                match words.as_slice() {
                    ["head", ..] => true,
                    ["grep", flags, ..] => {
                        flags.starts_with('-') && !flags.starts_with("--") && flags.contains('q')
                    }
                    _ => false,
                }
            });
            if bad {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                found.push((name, i + 1, line.trim().to_string()));
            }
        }
    }
    found
}

#[test]
fn no_script_under_pipefail_pipes_into_a_reader_that_stops_early() {
    let found = early_exit_pipes();
    assert!(
        found.is_empty(),
        "pipelines that fail at random under pipefail (write `grep -q P <<<\"$(cmd)\"`):\n{}",
        found
            .iter()
            .map(|(f, n, l)| format!("  scripts/{f}:{n}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
