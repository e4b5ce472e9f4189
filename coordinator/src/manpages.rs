//! Man pages from a binary's own clap definition (clap_mangen): the command's
//! page and one per subcommand (`workspace-create.1`). Used by `workspace man`
//! and `workspace-coordinator man`; the node binaries have the same in
//! `pilot::manpages` (the coordinator never links the pilot crate).

use std::path::{Path, PathBuf};

/// Writes `<name>.1` and `<name>-<sub>.1` for each subcommand into `dir`;
/// returns the files written.
pub fn write(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let name = cmd.get_name().to_string();
    let mut pages = vec![(name.clone(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let page = format!("{name}-{}", sub.get_name());
        pages.push((
            page.clone(),
            sub.clone()
                .display_name(page)
                .bin_name(format!("{name} {}", sub.get_name())),
        ));
    }
    let mut written = Vec::new();
    for (page, cmd) in pages {
        let path = dir.join(format!("{page}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| format!("rendering {page}: {e}"))?;
        std::fs::write(&path, buf).map_err(|e| format!("writing {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_page_per_command_and_subcommand_with_its_options() {
        let cmd = clap::Command::new("tool")
            .about("Does things")
            .arg(clap::Arg::new("level").long("level").help("How much"))
            .subcommand(clap::Command::new("go").about("Goes"));
        let dir = tempfile::tempdir().unwrap();
        let files = super::write(cmd, dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.1", "tool-go.1"]);
        let page = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            page.contains(".TH tool") && page.contains("level"),
            "{page}"
        );
    }
}
