//! Workload traces in, lease requests out: the Standard Workload Format of
//! the Parallel Workloads Archive (`.swf`) and Haizea's `;`-separated lease
//! file (`.csv`, the 12-field form: time; real start; image; image MB;
//! nodes; memory MB; CPU %; mode; deadline; duration; real duration; tag).
//!
//! A job becomes a request at its submit time for `ceil(processors /
//! cores_per_node)` nodes (requested processors, else allocated), running
//! for its run time, with its requested time as the user's estimate. Jobs
//! the trace itself marks unknown (`-1` size or run time) are skipped and
//! counted; anything else that is not a record is an error naming the line.

use std::path::Path;

/// The trace formats read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Swf,
    Haizea,
}

impl Format {
    /// By file name: `.csv` is Haizea's, anything else SWF.
    pub fn guess(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Format::Haizea,
            _ => Format::Swf,
        }
    }
}

/// One job of the trace, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// 1-based line of the file it came from.
    pub line: usize,
    /// The job's number in the trace (SWF field 1; Haizea: its line).
    pub id: u64,
    /// Seconds from the start of the trace.
    pub submit_s: f64,
    pub processors: u32,
    /// What it ran for.
    pub run_s: f64,
    /// What its user asked for (the estimate a batch system schedules by).
    pub requested_s: f64,
    /// Haizea: the VM's memory and image; SWF: none.
    pub memory_mb: Option<u64>,
    pub image: Option<String>,
    /// Haizea: an advance reservation.
    pub reservation: bool,
    /// Its start (seconds, as `submit_s`), when it is one.
    pub start_s: Option<f64>,
}

/// A trace, read whole.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub jobs: Vec<Job>,
    /// Jobs the trace marks unknown in size or run time.
    pub skipped: usize,
    /// From an SWF header: `MaxNodes`, `MaxProcs`, `UnixStartTime`.
    pub max_nodes: Option<u32>,
    pub max_procs: Option<u32>,
    pub unix_start_s: Option<u64>,
}

/// Why a trace cannot be read. Every variant names the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {what}")]
    Bad {
        path: String,
        line: usize,
        what: String,
    },
    #[error("{path}: no job in the trace")]
    Empty { path: String },
}

/// Reads the trace at `path` in `format`.
pub fn read(path: &Path, format: Format) -> Result<Trace, TraceError> {
    let text = std::fs::read(path).map_err(|source| TraceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let name = path.display().to_string();
    let text = String::from_utf8(text).map_err(|e| {
        // The line of the first byte that is not UTF-8.
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        TraceError::Bad {
            path: name.clone(),
            line: upto.iter().filter(|b| **b == b'\n').count() + 1,
            what: "not text (not UTF-8): is this a trace?".into(),
        }
    })?;
    let trace = parse(&text, format).map_err(|(line, what)| TraceError::Bad {
        path: name.clone(),
        line,
        what,
    })?;
    if trace.jobs.is_empty() {
        return Err(TraceError::Empty { path: name });
    }
    Ok(trace)
}

/// Parses trace text; an error is (line, what is wrong).
pub fn parse(text: &str, format: Format) -> Result<Trace, (usize, String)> {
    let mut trace = Trace::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() {
            continue;
        }
        match format {
            Format::Swf => {
                if let Some(h) = l.strip_prefix(';') {
                    header(h, &mut trace);
                    continue;
                }
                match swf_job(l, line)? {
                    Some(job) => trace.jobs.push(job),
                    None => trace.skipped += 1,
                }
            }
            Format::Haizea => {
                if l.starts_with('#') {
                    continue;
                }
                trace.jobs.push(haizea_job(l, line)?);
            }
        }
    }
    if let Some(w) = trace
        .jobs
        .windows(2)
        .find(|w| w[1].submit_s < w[0].submit_s)
    {
        return Err((
            w[1].line,
            format!(
                "submit time {} is before the previous job's ({}): a trace is in submit order",
                w[1].submit_s, w[0].submit_s
            ),
        ));
    }
    Ok(trace)
}

fn header(h: &str, trace: &mut Trace) {
    let Some((k, v)) = h.split_once(':') else {
        return;
    };
    let v = v.trim();
    match k.trim() {
        "MaxNodes" => trace.max_nodes = v.parse().ok(),
        "MaxProcs" => trace.max_procs = v.parse().ok(),
        "UnixStartTime" => trace.unix_start_s = v.parse().ok(),
        _ => {}
    }
}

fn number(fields: &[&str], i: usize, name: &str) -> Result<f64, String> {
    let f = fields
        .get(i)
        .ok_or_else(|| format!("field {} ({name}) is missing", i + 1))?;
    let v: f64 = f
        .parse()
        .map_err(|_| format!("field {} ({name}) is not a number: {f:?}", i + 1))?;
    if !v.is_finite() {
        return Err(format!("field {} ({name}) is not a number: {f:?}", i + 1));
    }
    Ok(v)
}

/// One SWF record; `None` for a job the trace marks unknown.
fn swf_job(l: &str, line: usize) -> Result<Option<Job>, (usize, String)> {
    let f: Vec<&str> = l.split_whitespace().collect();
    let at = |e: String| (line, e);
    if f.len() != 18 {
        return Err(at(format!(
            "an SWF record has 18 fields, this line has {}: is this an SWF trace?",
            f.len()
        )));
    }
    let id = number(&f, 0, "job number").map_err(at)?;
    let submit = number(&f, 1, "submit time").map_err(at)?;
    let run = number(&f, 3, "run time").map_err(at)?;
    let allocated = number(&f, 4, "allocated processors").map_err(at)?;
    let requested = number(&f, 7, "requested processors").map_err(at)?;
    let req_time = number(&f, 8, "requested time").map_err(at)?;
    if submit < 0.0 {
        return Err(at(format!("submit time {submit} is negative")));
    }
    for (v, name) in [
        (run, "run time"),
        (allocated, "allocated processors"),
        (requested, "requested processors"),
        (req_time, "requested time"),
    ] {
        if v < 0.0 && v != -1.0 {
            return Err(at(format!(
                "{name} {v} is negative (only -1, unknown, may be)"
            )));
        }
    }
    let processors = if requested > 0.0 {
        requested
    } else {
        allocated
    };
    if processors <= 0.0 || run < 0.0 {
        return Ok(None);
    }
    Ok(Some(Job {
        line,
        id: id as u64,
        submit_s: submit,
        processors: processors.round() as u32,
        run_s: run,
        requested_s: if req_time > 0.0 { req_time } else { run },
        memory_mb: None,
        image: None,
        reservation: false,
        start_s: None,
    }))
}

/// One Haizea lease line (the 12-field form).
fn haizea_job(l: &str, line: usize) -> Result<Job, (usize, String)> {
    let f: Vec<&str> = l.split(';').map(str::trim).collect();
    let at = |e: String| (line, e);
    if f.len() != 12 {
        return Err(at(format!(
            "a Haizea lease line has 12 ';'-separated fields, this one has {}: is this a Haizea trace?",
            f.len()
        )));
    }
    let submit = number(&f, 0, "time").map_err(at)?;
    let nodes = number(&f, 4, "nodes").map_err(at)?;
    let memory = number(&f, 5, "memory").map_err(at)?;
    let duration = number(&f, 9, "duration").map_err(at)?;
    let real = number(&f, 10, "real duration").map_err(at)?;
    for (v, name) in [
        (submit, "time"),
        (memory, "memory"),
        (duration, "duration"),
        (real, "real duration"),
    ] {
        if v < 0.0 {
            return Err(at(format!("{name} {v} is negative")));
        }
    }
    if nodes < 1.0 {
        return Err(at(format!("nodes {nodes} is not a positive count")));
    }
    Ok(Job {
        line,
        id: line as u64,
        submit_s: submit,
        processors: nodes.round() as u32,
        run_s: real,
        requested_s: duration,
        memory_mb: Some(memory as u64),
        image: Some(f[2].to_string()).filter(|i| !i.is_empty() && i != "NONE"),
        reservation: f[8] != "NULL",
        start_s: if f[8] == "NULL" {
            None
        } else {
            // Field 2 is when it starts; field 9 how far ahead it was asked.
            Some(number(&f, 1, "start").map_err(at)?)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWF: &str = "; Version: 2.2
; MaxNodes: 100
; MaxProcs: 100
; UnixStartTime: 843480031
   15   599850 192180   3477    4     -1    -1    4  53940    -1  1  12  12  -1 -1 -1 -1 -1
   16   600022  11940   2488   25     -1    -1   25   3600    -1  1  13  13  -1 -1 -1 -1 -1
   17   600476 364560     -1    5     -1    -1    5 215400    -1  0  14  14  -1 -1 -1 -1 -1
   18   600836  32100  35373   -1     -1    -1   -1  36000    -1  1  15  15  -1 -1 -1 -1 -1
";

    #[test]
    fn swf_records_become_jobs_and_unknown_ones_are_counted() {
        let t = parse(SWF, Format::Swf).expect("parses");
        assert_eq!(t.jobs.len(), 2);
        assert_eq!(t.skipped, 2, "run time -1, size -1");
        assert_eq!(
            (t.max_nodes, t.unix_start_s),
            (Some(100), Some(843_480_031))
        );
        let j = &t.jobs[1];
        assert_eq!(
            (
                j.line,
                j.id,
                j.submit_s,
                j.processors,
                j.run_s,
                j.requested_s
            ),
            (6, 16, 600_022.0, 25, 2488.0, 3600.0)
        );
    }

    #[test]
    fn haizea_lines_become_jobs() {
        let t = parse(
            "56;56;NONE;600;8;1024;100;RW;NULL;14400;13;BATCH\n# a comment\n60;60;img;600;2;512;100;RW;3600;7200;100;AR\n",
            Format::Haizea,
        )
        .expect("parses");
        assert_eq!(t.jobs.len(), 2);
        let (a, b) = (&t.jobs[0], &t.jobs[1]);
        assert_eq!((a.processors, a.run_s, a.requested_s), (8, 13.0, 14_400.0));
        assert_eq!(
            (a.memory_mb, a.image.as_deref(), a.reservation),
            (Some(1024), None, false)
        );
        assert_eq!(
            (b.line, b.image.as_deref(), b.reservation),
            (3, Some("img"), true)
        );
    }

    #[test]
    fn bad_input_is_refused_with_its_line() {
        let bad = |text: &str, f: Format| parse(text, f).expect_err("refused");
        let (line, what) = bad(
            &SWF.replace("   16   600022", "   16   -60022"),
            Format::Swf,
        );
        assert_eq!(line, 6);
        assert!(what.contains("submit time -60022 is negative"), "{what}");
        let (line, what) = bad(&SWF.replace(" 2488 ", " 2x88 "), Format::Swf);
        assert_eq!(line, 6);
        assert!(
            what.contains("field 4 (run time) is not a number"),
            "{what}"
        );
        let (line, what) = bad("; header\n1 2 3\n", Format::Swf);
        assert_eq!(line, 2);
        assert!(what.contains("18 fields"), "{what}");
        let (line, what) = bad("name = \"not a trace\"\n", Format::Haizea);
        assert_eq!(line, 1);
        assert!(what.contains("12 ';'-separated fields"), "{what}");
        let (line, what) = bad("1;1;x;1;2;512;100;RW;NULL;60;-5;BATCH\n", Format::Haizea);
        assert_eq!(line, 1);
        assert!(what.contains("real duration -5 is negative"), "{what}");
        let (line, what) = bad(
            &SWF.replace("   16   600022", "   16   500022"),
            Format::Swf,
        );
        assert_eq!(line, 6);
        assert!(what.contains("submit order"), "{what}");
    }

    #[test]
    fn a_file_that_is_not_text_or_holds_no_job_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let bin = dir.path().join("x.swf");
        std::fs::write(&bin, b"; ok\n\xff\xfe\x00\x01").expect("write");
        let e = read(&bin, Format::Swf).expect_err("binary");
        assert!(e.to_string().contains("line 2: not text"), "{e}");
        let empty = dir.path().join("e.swf");
        std::fs::write(&empty, "; only a header\n").expect("write");
        let e = read(&empty, Format::Swf).expect_err("empty");
        assert!(e.to_string().contains("no job"), "{e}");
    }
}
