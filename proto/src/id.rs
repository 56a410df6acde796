//! Wire IDs: `prefix-{uuid}` (`sb-`, `usr-`, `team-`, `key-`, `host-`, `tpl-`, `log-`,
//! `wh-`, `evt-`, `bld-`).
//!
//! Parsed strictly at every API and RPC boundary; everything inside works with [`Uuid`].
//! Accepted form: the prefix, a hyphen, then the 36-character lower-case hyphenated UUID.
//! Upper case, braces, URNs and the simple (no hyphen) form are refused, so one entity has
//! exactly one spelling.

use std::fmt;

pub use uuid::Uuid;

/// Entity kinds that have wire IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Sandbox,
    User,
    Team,
    Key,
    Host,
    Template,
    Log,
    Webhook,
    Event,
    Build,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Sandbox,
        Kind::User,
        Kind::Team,
        Kind::Key,
        Kind::Host,
        Kind::Template,
        Kind::Log,
        Kind::Webhook,
        Kind::Event,
        Kind::Build,
    ];

    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Sandbox => "sb",
            Kind::User => "usr",
            Kind::Team => "team",
            Kind::Key => "key",
            Kind::Host => "host",
            Kind::Template => "tpl",
            Kind::Log => "log",
            Kind::Webhook => "wh",
            Kind::Event => "evt",
            Kind::Build => "bld",
        }
    }

    pub const fn noun(self) -> &'static str {
        match self {
            Kind::Sandbox => "sandbox",
            Kind::User => "user",
            Kind::Team => "team",
            Kind::Key => "api key",
            Kind::Host => "host",
            Kind::Template => "template",
            Kind::Log => "audit log",
            Kind::Webhook => "webhook",
            Kind::Event => "event",
            Kind::Build => "build",
        }
    }
}

/// Why a wire ID was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    /// The input is longer than any valid ID.
    TooLong { len: usize },
    /// The input does not start with the expected `prefix-`.
    WrongPrefix { expected: Kind },
    /// The part after the prefix is not a lower-case hyphenated UUID.
    BadUuid { kind: Kind },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::TooLong { len } => write!(f, "id is {len} bytes long, longer than any id"),
            IdError::WrongPrefix { expected } => {
                write!(
                    f,
                    "{} id must start with \"{}-\"",
                    expected.noun(),
                    expected.prefix()
                )
            }
            IdError::BadUuid { kind } => write!(
                f,
                "{} id must be \"{}-\" followed by a lower-case hyphenated uuid",
                kind.noun(),
                kind.prefix()
            ),
        }
    }
}

impl std::error::Error for IdError {}

/// Longest valid wire ID: `team-` + 36.
pub const ID_LEN_MAX: usize = 5 + 36;

/// Formats `uuid` as a wire ID of `kind`.
pub fn format(kind: Kind, uuid: Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let s = uuid.hyphenated().encode_lower(&mut buf);
    let mut out = String::with_capacity(kind.prefix().len() + 1 + s.len());
    out.push_str(kind.prefix());
    out.push('-');
    out.push_str(s);
    out
}

/// Parses a wire ID of `kind` strictly.
pub fn parse(kind: Kind, s: &str) -> Result<Uuid, IdError> {
    if s.len() > ID_LEN_MAX {
        return Err(IdError::TooLong { len: s.len() });
    }
    let rest = s
        .strip_prefix(kind.prefix())
        .and_then(|r| r.strip_prefix('-'))
        .ok_or(IdError::WrongPrefix { expected: kind })?;
    parse_uuid_strict(rest).ok_or(IdError::BadUuid { kind })
}

/// Parses exactly the 36-character lower-case hyphenated form.
pub fn parse_uuid_strict(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        };
        if !ok {
            return None;
        }
    }
    Uuid::parse_str(s).ok()
}

macro_rules! kind_fns {
    ($($fmt:ident, $parse:ident, $kind:expr;)*) => {
        $(
            #[doc = concat!("Formats a wire ID of this kind.")]
            pub fn $fmt(uuid: Uuid) -> String { format($kind, uuid) }
            #[doc = concat!("Parses a wire ID of this kind strictly.")]
            pub fn $parse(s: &str) -> Result<Uuid, IdError> { parse($kind, s) }
        )*
    };
}

kind_fns! {
    format_sandbox, parse_sandbox, Kind::Sandbox;
    format_user, parse_user, Kind::User;
    format_team, parse_team, Kind::Team;
    format_key, parse_key, Kind::Key;
    format_host, parse_host, Kind::Host;
    format_template, parse_template, Kind::Template;
    format_log, parse_log, Kind::Log;
}

/// Fuzz entry point: parsing arbitrary bytes never panics, and what parses formats back
/// to the same string.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for kind in Kind::ALL {
        if let Ok(u) = parse(kind, s) {
            assert_eq!(format(kind, u), s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        let u = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        for kind in Kind::ALL {
            let s = format(kind, u);
            assert!(s.starts_with(kind.prefix()));
            assert_eq!(parse(kind, &s), Ok(u));
        }
        assert_eq!(format_sandbox(u), "sb-01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(
            format_team(Uuid::nil()),
            "team-00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn refuses_other_spellings() {
        let good = "sb-01234567-89ab-cdef-0123-456789abcdef";
        assert!(parse_sandbox(good).is_ok());
        for bad in [
            "",
            "sb-",
            "sb01234567-89ab-cdef-0123-456789abcdef",
            "tpl-01234567-89ab-cdef-0123-456789abcdef",
            "sb-01234567-89AB-cdef-0123-456789abcdef",
            "sb-0123456789abcdef0123456789abcdef",
            "sb-{01234567-89ab-cdef-0123-456789abcdef}",
            "sb-01234567-89ab-cdef-0123-456789abcdeg",
            "sb-01234567-89ab-cdef-0123-456789abcdef ",
            "sb-01234567-89ab-cdef-0123_456789abcdef",
            "sb-01234567-89ab-cdef-0123-456789abcdef-01234567-89ab-cdef",
        ] {
            assert!(parse_sandbox(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(
            parse_sandbox("tpl-01234567-89ab-cdef-0123-456789abcdef")
                .unwrap_err()
                .to_string(),
            "sandbox id must start with \"sb-\""
        );
    }

    #[test]
    fn fuzz_entry_accepts_garbage() {
        fuzz_parse(b"\xff\xfe");
        fuzz_parse(b"sb-01234567-89ab-cdef-0123-456789abcdef");
    }
}
