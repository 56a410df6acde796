//! A small hand-written flag parser for the `wrenn image` subcommands:
//! `--name value`, `--name=value` and boolean `--name`; no positional arguments.

use std::fmt;

/// One accepted flag.
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    pub name: &'static str,
    pub takes_value: bool,
    /// May be given more than once (values are kept in order).
    pub repeatable: bool,
}

impl Flag {
    pub const fn value(name: &'static str) -> Self {
        Flag {
            name,
            takes_value: true,
            repeatable: false,
        }
    }
    pub const fn switch(name: &'static str) -> Self {
        Flag {
            name,
            takes_value: false,
            repeatable: false,
        }
    }
    pub const fn repeated(name: &'static str) -> Self {
        Flag {
            name,
            takes_value: true,
            repeatable: true,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgError {
    Unknown(String),
    MissingValue(&'static str),
    UnexpectedValue(&'static str),
    Duplicate(&'static str),
    Positional(String),
    BadValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Unknown(a) => write!(f, "unknown flag {a:?}"),
            ArgError::MissingValue(n) => write!(f, "--{n} needs a value"),
            ArgError::UnexpectedValue(n) => write!(f, "--{n} takes no value"),
            ArgError::Duplicate(n) => write!(f, "--{n} given more than once"),
            ArgError::Positional(a) => write!(f, "unexpected argument {a:?}"),
            ArgError::BadValue {
                flag,
                value,
                reason,
            } => write!(f, "bad value {value:?} for --{flag}: {reason}"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parsed flags, in command-line order.
#[derive(Debug, Default)]
pub struct Parsed {
    items: Vec<(&'static str, Option<String>)>,
}

/// Parses `args` (the words after the subcommand) against `flags`.
pub fn parse(args: &[String], flags: &[Flag]) -> Result<Parsed, ArgError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ArgError::Positional(arg.clone()));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(flag) = flags.iter().find(|f| f.name == name) else {
            return Err(ArgError::Unknown(arg.clone()));
        };
        if !flag.repeatable && parsed.items.iter().any(|(n, _)| *n == flag.name) {
            return Err(ArgError::Duplicate(flag.name));
        }
        let value = if flag.takes_value {
            match inline {
                Some(v) => Some(v),
                None => {
                    let v = args.get(i).ok_or(ArgError::MissingValue(flag.name))?;
                    if v.starts_with("--") {
                        return Err(ArgError::MissingValue(flag.name));
                    }
                    i += 1;
                    Some(v.clone())
                }
            }
        } else {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(flag.name));
            }
            None
        };
        if let Some(v) = &value {
            if v.is_empty() {
                return Err(ArgError::MissingValue(flag.name));
            }
        }
        parsed.items.push((flag.name, value));
    }
    Ok(parsed)
}

impl Parsed {
    /// The value of a single-valued flag.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value of a repeatable flag, in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.items
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    pub fn switch(&self, name: &str) -> bool {
        self.items.iter().any(|(n, _)| *n == name)
    }

    /// An unsigned number within `min..=max`.
    pub fn number(
        &self,
        flag: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ArgError> {
        let Some(v) = self.value(flag) else {
            return Ok(default);
        };
        let bad = |reason: String| ArgError::BadValue {
            flag,
            value: v.to_string(),
            reason,
        };
        let n: u64 = v.parse().map_err(|_| bad("not a number".to_string()))?;
        if n < min || n > max {
            return Err(bad(format!("must be within {min}..={max}")));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: &[Flag] = &[
        Flag::value("state-root"),
        Flag::switch("force"),
        Flag::repeated("nameserver"),
        Flag::value("size-mib"),
    ];

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn both_value_forms_switches_and_repeats() {
        let p = parse(
            &args(&[
                "--state-root",
                "/x",
                "--force",
                "--nameserver=1.1.1.1",
                "--nameserver",
                "8.8.8.8",
            ]),
            FLAGS,
        )
        .unwrap();
        assert_eq!(p.value("state-root"), Some("/x"));
        assert!(p.switch("force"));
        assert_eq!(p.values("nameserver"), ["1.1.1.1", "8.8.8.8"]);
        assert_eq!(p.value("size-mib"), None);
        assert_eq!(p.number("size-mib", 5120, 1, 10).unwrap(), 5120);
    }

    #[test]
    fn errors() {
        let e = |a: &[&str]| parse(&args(a), FLAGS).unwrap_err();
        assert_eq!(e(&["--nope"]), ArgError::Unknown("--nope".into()));
        assert_eq!(e(&["--state-root"]), ArgError::MissingValue("state-root"));
        assert_eq!(
            e(&["--state-root", "--force"]),
            ArgError::MissingValue("state-root")
        );
        assert_eq!(e(&["--state-root="]), ArgError::MissingValue("state-root"));
        assert_eq!(e(&["--force=yes"]), ArgError::UnexpectedValue("force"));
        assert_eq!(e(&["--force", "--force"]), ArgError::Duplicate("force"));
        assert_eq!(e(&["kernel"]), ArgError::Positional("kernel".into()));
        assert_eq!(e(&["-f"]), ArgError::Positional("-f".into()));
    }

    #[test]
    fn numbers_are_checked() {
        let p = parse(&args(&["--size-mib", "12x"]), FLAGS).unwrap();
        assert!(matches!(
            p.number("size-mib", 1, 1, 100),
            Err(ArgError::BadValue { .. })
        ));
        let p = parse(&args(&["--size-mib=101"]), FLAGS).unwrap();
        let err = p.number("size-mib", 1, 1, 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad value \"101\" for --size-mib: must be within 1..=100"
        );
        let p = parse(&args(&["--size-mib=64"]), FLAGS).unwrap();
        assert_eq!(p.number("size-mib", 1, 1, 100).unwrap(), 64);
    }
}
