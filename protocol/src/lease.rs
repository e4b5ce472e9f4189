//! Lease kinds (Haizea's, seed 002) and a reservation's start time, as a
//! spec writes them:
//!
//! ```toml
//! kind = "reservation"              # "best_effort" (the default), "reservation", "immediate"
//! start = "2026-12-01T10:00:00Z"    # RFC 3339, any offset (kept in UTC), or "+2h" from acceptance
//! ```
//!
//! A `start` without `kind` is a reservation. The coordinator resolves a
//! relative start against its own clock when it accepts the lease and stores
//! the absolute time ([`Start::resolve`]), so a restart never moves it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// How a lease gets its capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// Queued; started when the batch system gives slots (today's default).
    #[default]
    BestEffort,
    /// Starts at `start`, guaranteed by a reservation in the batch system, or refused.
    Reservation,
    /// Now, guaranteed, or refused; never queued.
    Immediate,
}

impl LeaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BestEffort => "best_effort",
            Self::Reservation => "reservation",
            Self::Immediate => "immediate",
        }
    }
}

impl std::fmt::Display for LeaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reservation's start: an instant (ms since the epoch, UTC) or an offset
/// from the moment the coordinator accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    At(u64),
    In(Duration),
}

/// Why a start is not acceptable (the caller names the field).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    #[error("{0}")]
    Malformed(String),
    #[error("{at} is in the past (now is {now})")]
    Past { at: String, now: String },
    #[error("{at} is further out than the coordinator's reservation horizon of {horizon} (latest start {latest})")]
    BeyondHorizon {
        at: String,
        horizon: String,
        latest: String,
    },
}

impl Start {
    /// Parses `"+2h"` (offset) or an RFC 3339 time with any offset
    /// (`2026-12-01T11:00:00+01:00` is kept as `2026-12-01T10:00:00Z`).
    pub fn parse(text: &str) -> Result<Self, StartError> {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix('+') {
            return crate::spec::parse_duration(rest)
                .map(Start::In)
                .map_err(|e| StartError::Malformed(format!("{t:?}: bad offset: {e}")));
        }
        let parsed =
            ::time::OffsetDateTime::parse(t, &::time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    StartError::Malformed(format!(
                        "{t:?} is not a time like \"2026-12-01T10:00:00Z\" (RFC 3339, with Z or an offset such as +01:00) or an offset like \"+2h\" ({e})"
                    ))
                })?;
        let ms = parsed.unix_timestamp_nanos() / 1_000_000;
        u64::try_from(ms)
            .map(Start::At)
            .map_err(|_| StartError::Malformed(format!("{t:?} is before 1970")))
    }

    /// The absolute start in ms, checked against `now_ms` and the horizon:
    /// not in the past, at most `horizon` ahead.
    pub fn resolve(self, now_ms: u64, horizon: Duration) -> Result<u64, StartError> {
        let at = match self {
            Start::At(ms) => ms,
            Start::In(d) => now_ms.saturating_add(d.as_millis() as u64),
        };
        if at < now_ms {
            return Err(StartError::Past {
                at: crate::time::format_ms(at),
                now: crate::time::format_ms(now_ms),
            });
        }
        let latest = now_ms.saturating_add(horizon.as_millis() as u64);
        if at > latest {
            return Err(StartError::BeyondHorizon {
                at: crate::time::format_ms(at),
                horizon: humantime::format_duration(horizon).to_string(),
                latest: crate::time::format_ms(latest),
            });
        }
        Ok(at)
    }
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::At(ms) if ms % 1000 == 0 => {
                let t = std::time::UNIX_EPOCH + Duration::from_millis(*ms);
                write!(f, "{}", humantime::format_rfc3339_seconds(t))
            }
            Start::At(ms) => f.write_str(&crate::time::format_ms(*ms)),
            Start::In(d) => write!(f, "+{}s", d.as_secs()),
        }
    }
}

impl Serialize for Start {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Start;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a time like \"2026-12-01T10:00:00Z\" or an offset like \"+2h\"")
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<Start, E> {
                Start::parse(t).map_err(E::custom)
            }
            // A bare TOML datetime (`start = 2026-12-01T10:00:00Z`) arrives as a
            // one-entry map; a local one (no offset) is refused by the parser.
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Start, A::Error> {
                let _key: Option<String> = map.next_key()?;
                let text: String = map.next_value()?;
                Start::parse(&text).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_000_000_000; // 2026-11-18T...

    #[test]
    fn offsets_are_normalized_to_utc_and_relative_starts_resolve_from_now() {
        let a = Start::parse("2026-12-01T11:00:00+01:00").unwrap();
        let b = Start::parse("2026-12-01T10:00:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(b.to_string(), "2026-12-01T10:00:00Z");
        assert_eq!(Start::parse(&b.to_string()).unwrap(), b);
        let r = Start::parse("+2h").unwrap();
        assert_eq!(r, Start::In(Duration::from_secs(7200)));
        let day = Duration::from_secs(86_400);
        assert_eq!(r.resolve(T0, day).unwrap(), T0 + 7_200_000);
        assert_eq!(Start::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn past_beyond_horizon_and_malformed_starts_say_why() {
        let day = Duration::from_secs(86_400);
        let past = Start::At(T0 - 1000).resolve(T0, day).unwrap_err();
        assert!(matches!(past, StartError::Past { .. }), "{past}");
        assert!(past.to_string().contains("in the past"), "{past}");
        let far = Start::In(2 * day).resolve(T0, day).unwrap_err();
        assert!(far.to_string().contains("horizon of 1day"), "{far}");
        for bad in [
            "tomorrow",
            "2026-12-01 10:00",
            "2026-12-01T10:00:00",
            "2026-13-01T10:00:00Z",
            "+soon",
        ] {
            let e = Start::parse(bad).unwrap_err();
            assert!(matches!(e, StartError::Malformed(_)), "{bad}: {e}");
            assert!(e.to_string().contains(bad.trim_start_matches('+')), "{e}");
        }
    }
}
