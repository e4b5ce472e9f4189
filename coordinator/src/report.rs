//! How the binaries print an error: the whole chain on one line, each cause
//! once. Libraries here and below (reqwest, std::io) sometimes repeat their
//! source inside their own message; the chain is then printed as
//! `listening on 127.0.0.1:8750: Address already in use (os error 98)`,
//! not with the cause twice. Not here: hints (each binary knows its own).

use std::error::Error;

/// `outer: cause: root cause`, skipping a cause whose text the line already
/// ends with or contains.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("listening on {addr}: {source}")]
    struct Repeats {
        addr: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting the coordinator")]
    struct Outer(#[source] Repeats);

    #[test]
    fn each_cause_is_printed_once() {
        let e = Outer(Repeats {
            addr: "127.0.0.1:8750".into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use"),
        });
        assert_eq!(
            one_line(&e),
            "starting the coordinator: listening on 127.0.0.1:8750: Address already in use"
        );
        let any = anyhow::Error::new(e).context("serve");
        assert_eq!(
            one_line(any.as_ref()),
            "serve: starting the coordinator: listening on 127.0.0.1:8750: Address already in use"
        );
    }
}
