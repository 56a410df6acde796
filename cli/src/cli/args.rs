//! A hand-written argument parser for the API subcommands: each command declares its flags
//! and positional arguments in a static [`Command`]; [`parse`] checks argv against it and
//! [`usage`] renders its `--help`.
//!
//! Rules: `--flag value` or `--flag=value`; boolean flags take no value; a repeatable flag
//! may appear many times; `--` ends the flags; `-h`/`--help` anywhere asks for help. For a
//! command with a trailing command line (`sandbox exec ID CMD ARGS...`), everything after
//! the required positionals is that command line, flags included.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// One flag of a command.
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    pub name: &'static str,
    /// Placeholder of the value (`SECONDS`); `None` for a boolean flag.
    pub value: Option<&'static str>,
    pub repeat: bool,
    pub help: &'static str,
}

/// One positional argument.
#[derive(Clone, Copy, Debug)]
pub struct Arg {
    pub name: &'static str,
    pub required: bool,
    pub help: &'static str,
}

/// A subcommand's shape.
#[derive(Debug)]
pub struct Command {
    /// `sandbox create`.
    pub path: &'static str,
    /// The `wrenn.ctl.v1` methods it calls (checked against the service descriptors).
    pub rpcs: &'static [&'static str],
    pub about: &'static str,
    pub args: &'static [Arg],
    pub flags: &'static [Flag],
    /// Name of a trailing command line (`CMD [ARGS...]`), if the command takes one.
    pub rest: Option<&'static str>,
}

/// Flags every API command accepts.
pub const GLOBAL: &[Flag] = &[
    Flag {
        name: "json",
        value: None,
        repeat: false,
        help: "print JSON (one object; NDJSON for streams) instead of tables",
    },
    Flag {
        name: "url",
        value: Some("HOST:PORT"),
        repeat: false,
        help: "ctl's protobuf address (env WRENN_URL, default 127.0.0.1:7700)",
    },
    Flag {
        name: "ca",
        value: Some("FILE"),
        repeat: false,
        help: "CA certificate (PEM) ctl's TLS certificate must chain to (env WRENN_CA)",
    },
    Flag {
        name: "plaintext",
        value: None,
        repeat: false,
        help: "connect without TLS, to a ctl serving --plaintext (env WRENN_PLAINTEXT=1)",
    },
    Flag {
        name: "api-key",
        value: Some("KEY"),
        repeat: false,
        help: "API key (env WRENN_API_KEY)",
    },
    Flag {
        name: "deadline",
        value: Some("SECONDS"),
        repeat: false,
        help: "call deadline (default: 600 for lifecycle calls, 60 otherwise)",
    },
];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// (flag, value) in order; booleans have "".
    pub flags: Vec<(&'static str, String)>,
    pub args: Vec<String>,
    pub rest: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgError {
    /// `--help` was given.
    Help,
    UnknownFlag(String),
    MissingValue(&'static str),
    UnexpectedValue(&'static str),
    Repeated(&'static str),
    MissingArg(&'static str),
    ExtraArg(String),
    Invalid {
        what: String,
        value: String,
        why: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Help => f.write_str("help requested"),
            ArgError::UnknownFlag(s) => write!(f, "unknown flag {s:?}"),
            ArgError::MissingValue(n) => write!(f, "--{n} needs a value"),
            ArgError::UnexpectedValue(n) => write!(f, "--{n} takes no value"),
            ArgError::Repeated(n) => write!(f, "--{n} given more than once"),
            ArgError::MissingArg(n) => write!(f, "missing argument {n}"),
            ArgError::ExtraArg(s) => write!(f, "unexpected argument {s:?}"),
            ArgError::Invalid { what, value, why } => write!(f, "{what}: {value:?}: {why}"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parses `argv` (the words after the command path) against `cmd`.
pub fn parse(cmd: &'static Command, argv: &[String]) -> Result<Parsed, ArgError> {
    let mut p = Parsed::default();
    let required = cmd.args.iter().filter(|a| a.required).count();
    let mut i = 0;
    let mut flags_done = false;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if cmd.rest.is_some() && p.args.len() >= required && !a.starts_with('-') {
            // The trailing command line starts here and takes everything after it.
            p.rest.push(a.clone());
            p.rest.extend(argv[i..].iter().cloned());
            break;
        }
        if !flags_done && (a == "-h" || a == "--help") {
            return Err(ArgError::Help);
        }
        if !flags_done && a == "--" {
            flags_done = true;
            if cmd.rest.is_some() && p.args.len() >= required {
                p.rest.extend(argv[i..].iter().cloned());
                break;
            }
            continue;
        }
        // The one short flag: -f for --file, on commands that have --file.
        let long;
        let a = if !flags_done && a == "-f" && cmd.flags.iter().any(|f| f.name == "file") {
            long = "--file".to_owned();
            &long
        } else {
            a
        };
        if !flags_done && a.starts_with("--") {
            let body = &a[2..];
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let flag = cmd
                .flags
                .iter()
                .chain(GLOBAL.iter())
                .find(|f| f.name == name)
                .ok_or_else(|| ArgError::UnknownFlag(a.clone()))?;
            let value = match (flag.value, inline) {
                (None, None) => String::new(),
                (None, Some(_)) => return Err(ArgError::UnexpectedValue(flag.name)),
                (Some(_), Some(v)) => v,
                (Some(_), None) => {
                    let v = argv.get(i).ok_or(ArgError::MissingValue(flag.name))?;
                    i += 1;
                    v.clone()
                }
            };
            if !flag.repeat && p.flags.iter().any(|(n, _)| *n == flag.name) {
                return Err(ArgError::Repeated(flag.name));
            }
            p.flags.push((flag.name, value));
            continue;
        }
        if !flags_done && a.starts_with('-') && a.len() > 1 && a.parse::<i64>().is_err() {
            return Err(ArgError::UnknownFlag(a.clone()));
        }
        if p.args.len() < cmd.args.len() {
            p.args.push(a.clone());
        } else if cmd.rest.is_some() {
            p.rest.push(a.clone());
            p.rest.extend(argv[i..].iter().cloned());
            break;
        } else {
            return Err(ArgError::ExtraArg(a.clone()));
        }
    }
    if let Some(missing) = cmd.args.iter().filter(|a| a.required).nth(p.args.len()) {
        if p.args.len() < required {
            return Err(ArgError::MissingArg(missing.name));
        }
    }
    if let Some(rest) = cmd.rest {
        if p.rest.is_empty() {
            return Err(ArgError::MissingArg(rest));
        }
    }
    Ok(p)
}

impl Parsed {
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| *n == name)
    }
    pub fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(String::as_str)
    }
    /// A parsed numeric (or other `FromStr`) flag value.
    pub fn num<T: FromStr>(&self, name: &str) -> Result<Option<T>, ArgError>
    where
        T::Err: fmt::Display,
    {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|e| ArgError::Invalid {
                what: format!("--{name}"),
                value: v.to_owned(),
                why: e.to_string(),
            }),
        }
    }
    /// `KEY=VALUE` pairs of a repeatable flag.
    pub fn pairs(&self, name: &str) -> Result<Vec<(String, String)>, ArgError> {
        self.values(name)
            .into_iter()
            .map(|v| {
                v.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, x)| (k.to_owned(), x.to_owned()))
                    .ok_or_else(|| ArgError::Invalid {
                        what: format!("--{name}"),
                        value: v.to_owned(),
                        why: "expected KEY=VALUE".into(),
                    })
            })
            .collect()
    }
}

/// `--help` text of a command.
pub fn usage(cmd: &Command) -> String {
    let mut s = format!("usage: wrenn {}", cmd.path);
    for a in cmd.args {
        if a.required {
            s.push_str(&format!(" {}", a.name));
        } else {
            s.push_str(&format!(" [{}]", a.name));
        }
    }
    if !cmd.flags.is_empty() {
        s.push_str(" [flags]");
    }
    if let Some(r) = cmd.rest {
        s.push_str(&format!(" [--] {r}"));
    }
    s.push_str(&format!("\n\n{}\n", cmd.about));
    if !cmd.args.is_empty() {
        s.push_str("\narguments:\n");
        for a in cmd.args {
            s.push_str(&format!("  {:<22} {}\n", a.name, a.help));
        }
    }
    let line = |f: &Flag| {
        let head = match f.value {
            Some(v) => format!("--{} {v}", f.name),
            None => format!("--{}", f.name),
        };
        let rep = if f.repeat { " (repeatable)" } else { "" };
        format!("  {head:<22} {}{rep}\n", f.help)
    };
    if !cmd.flags.is_empty() {
        s.push_str("\nflags:\n");
        for f in cmd.flags {
            s.push_str(&line(f));
        }
    }
    s.push_str("\nglobal flags:\n");
    for f in GLOBAL {
        s.push_str(&line(f));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    static EXEC: Command = Command {
        path: "sandbox exec",
        rpcs: &[],
        about: "run",
        args: &[Arg {
            name: "SANDBOX",
            required: true,
            help: "id",
        }],
        flags: &[
            Flag {
                name: "env",
                value: Some("K=V"),
                repeat: true,
                help: "",
            },
            Flag {
                name: "background",
                value: None,
                repeat: false,
                help: "",
            },
            Flag {
                name: "timeout-ms",
                value: Some("MS"),
                repeat: false,
                help: "",
            },
        ],
        rest: Some("CMD [ARGS...]"),
    };
    static GET: Command = Command {
        path: "sandbox get",
        rpcs: &[],
        about: "get",
        args: &[
            Arg {
                name: "SANDBOX",
                required: true,
                help: "id",
            },
            Arg {
                name: "MORE",
                required: false,
                help: "",
            },
        ],
        flags: &[],
        rest: None,
    };

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn flags_positionals_and_rest() {
        let p = parse(
            &EXEC,
            &v(&[
                "--env",
                "A=1",
                "sb-1",
                "--env=B=2",
                "--json",
                "ls",
                "-l",
                "--env",
                "x",
            ]),
        )
        .unwrap();
        assert_eq!(p.args, v(&["sb-1"]));
        assert_eq!(p.rest, v(&["ls", "-l", "--env", "x"]));
        assert_eq!(
            p.pairs("env").unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert!(p.flag("json"));
        let p = parse(&EXEC, &v(&["sb-1", "--background", "--", "--weird", "x"])).unwrap();
        assert!(p.flag("background"));
        assert_eq!(p.rest, v(&["--weird", "x"]));
        let p = parse(&EXEC, &v(&["sb-1", "--timeout-ms", "5", "sh"])).unwrap();
        assert_eq!(p.num::<u64>("timeout-ms").unwrap(), Some(5));
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(
            parse(&EXEC, &v(&["sb-1"])),
            Err(ArgError::MissingArg("CMD [ARGS...]"))
        );
        assert_eq!(parse(&EXEC, &v(&[])), Err(ArgError::MissingArg("SANDBOX")));
        assert_eq!(parse(&GET, &v(&[])), Err(ArgError::MissingArg("SANDBOX")));
        assert_eq!(
            parse(&GET, &v(&["a", "b", "c"])),
            Err(ArgError::ExtraArg("c".into()))
        );
        assert_eq!(
            parse(&GET, &v(&["a", "--nope"])),
            Err(ArgError::UnknownFlag("--nope".into()))
        );
        assert_eq!(
            parse(&GET, &v(&["a", "-x"])),
            Err(ArgError::UnknownFlag("-x".into()))
        );
        assert_eq!(
            parse(&GET, &v(&["a", "--url"])),
            Err(ArgError::MissingValue("url"))
        );
        assert_eq!(
            parse(&GET, &v(&["a", "--json=1"])),
            Err(ArgError::UnexpectedValue("json"))
        );
        assert_eq!(
            parse(&GET, &v(&["a", "--json", "--json"])),
            Err(ArgError::Repeated("json"))
        );
        assert_eq!(parse(&GET, &v(&["a", "--help"])), Err(ArgError::Help));
        assert_eq!(parse(&EXEC, &v(&["-h"])), Err(ArgError::Help));
        let p = parse(&EXEC, &v(&["sb", "--timeout-ms", "x", "ls"])).unwrap();
        assert!(matches!(
            p.num::<u64>("timeout-ms"),
            Err(ArgError::Invalid { .. })
        ));
        let p = parse(&EXEC, &v(&["sb", "--env", "noequals", "ls"])).unwrap();
        assert!(p.pairs("env").is_err());
        // A negative number is a value, not a flag.
        assert_eq!(parse(&GET, &v(&["-5"])).unwrap().args, v(&["-5"]));
    }

    #[test]
    fn usage_lists_everything() {
        let u = usage(&EXEC);
        assert!(u.starts_with("usage: wrenn sandbox exec SANDBOX [flags] [--] CMD [ARGS...]"));
        assert!(u.contains("--env K=V") && u.contains("(repeatable)"));
        assert!(u.contains("--api-key KEY"));
    }
}
