//! Kernel `.config` files and fragments: parsing, merging and the required-options check.
//!
//! Both use Kconfig's own syntax: `CONFIG_NAME=value` (value `y`, `m`, a number or a quoted
//! string) and `# CONFIG_NAME is not set`; other `#` lines are comments. `make olddefconfig`
//! silently drops an option whose dependencies are not met, so after it runs every option of
//! the fragment is checked against the final `.config` and each one that does not hold is named.

use std::collections::BTreeMap;
use std::fmt;

/// One option's value as Kconfig writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `CONFIG_X=<raw>`, e.g. `y`, `m`, `32`, `"text"` (quotes kept).
    Set(String),
    /// `# CONFIG_X is not set` (or, in a fragment, `CONFIG_X=n`).
    NotSet,
}

impl Value {
    fn is_off(&self) -> bool {
        match self {
            Value::NotSet => true,
            Value::Set(v) => v == "n",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Set(v) => f.write_str(v),
            Value::NotSet => f.write_str("not set"),
        }
    }
}

/// A line that is neither an option, a "not set" marker, a comment nor blank.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub reason: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {:?}", self.line, self.reason, self.text)
    }
}

/// Options in file order (a fragment keeps its order so reports follow the file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub entries: Vec<(String, Value)>,
}

impl Options {
    /// The last value given for `name` (Kconfig lets a later line win).
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.entries
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Last-wins map, for lookups over a whole `.config`.
    pub fn to_map(&self) -> BTreeMap<&str, &Value> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v)).collect()
    }
}

fn valid_name(name: &str) -> bool {
    name.len() > "CONFIG_".len()
        && name.starts_with("CONFIG_")
        && name.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b.is_ascii_lowercase()
        })
}

/// Parses a `.config` or a fragment.
pub fn parse(text: &str) -> Result<Options, ParseError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |reason| ParseError {
            line: i + 1,
            text: raw.to_string(),
            reason,
        };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            if let Some(name) = comment.strip_suffix(" is not set") {
                if valid_name(name) {
                    entries.push((name.to_string(), Value::NotSet));
                    continue;
                }
                if name.starts_with("CONFIG_") {
                    return Err(err("bad option name"));
                }
            }
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(err("expected CONFIG_NAME=value"));
        };
        if !valid_name(name) {
            return Err(err("bad option name"));
        }
        if value.is_empty() {
            return Err(err("empty value"));
        }
        if value.starts_with('"') && (value.len() < 2 || !value.ends_with('"')) {
            return Err(err("unterminated string value"));
        }
        entries.push((name.to_string(), Value::Set(value.to_string())));
    }
    Ok(Options { entries })
}

/// A fragment option that does not hold in the final configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub name: String,
    pub wanted: Value,
    /// `None`: the option is absent from `.config` (its dependencies are not met).
    pub got: Option<Value>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.got {
            Some(got) => write!(f, "{} wanted {}, got {}", self.name, self.wanted, got),
            None => write!(
                f,
                "{} wanted {}, but it is absent (dependencies not met?)",
                self.name, self.wanted
            ),
        }
    }
}

/// Checks every option of `required` against `config` and returns those that do not hold,
/// in fragment order. `wanted=y` is not satisfied by `m`. A "not set" requirement holds when
/// the option is absent, "not set" or `n`.
pub fn check(required: &Options, config: &Options) -> Vec<Problem> {
    let map = config.to_map();
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (name, wanted) in &required.entries {
        if !seen.insert(name.as_str()) {
            continue;
        }
        // A fragment line listed twice: the last one is what was written to .config.
        let wanted = required.get(name).unwrap_or(wanted);
        let got = map.get(name.as_str()).copied();
        let holds = match (wanted.is_off(), got) {
            (true, None) => true,
            (true, Some(g)) => g.is_off(),
            (false, None) => false,
            (false, Some(g)) => g == wanted,
        };
        if !holds {
            problems.push(Problem {
                name: name.clone(),
                wanted: wanted.clone(),
                got: got.cloned(),
            });
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOT_CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
# Linux/x86 6.1.0 Kernel Configuration
#
CONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"
CONFIG_64BIT=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_BLK=m
# CONFIG_MODULES is not set
CONFIG_NR_CPUS=32
# CONFIG_PCI is not set
CONFIG_EXT4_FS=n
";

    fn opts(text: &str) -> Options {
        parse(text).expect("test input parses")
    }

    #[test]
    fn parses_values_not_set_and_comments() {
        let c = opts(DOT_CONFIG);
        assert_eq!(c.get("CONFIG_64BIT"), Some(&Value::Set("y".into())));
        assert_eq!(c.get("CONFIG_VIRTIO_BLK"), Some(&Value::Set("m".into())));
        assert_eq!(c.get("CONFIG_MODULES"), Some(&Value::NotSet));
        assert_eq!(c.get("CONFIG_NR_CPUS"), Some(&Value::Set("32".into())));
        assert_eq!(
            c.get("CONFIG_CC_VERSION_TEXT"),
            Some(&Value::Set("\"gcc (Debian 12.2.0-14) 12.2.0\"".into()))
        );
        assert_eq!(c.get("CONFIG_NOPE"), None);
        assert_eq!(c.entries.len(), 8);
    }

    #[test]
    fn later_line_wins() {
        let c = opts("CONFIG_A=y\n# CONFIG_A is not set\n");
        assert_eq!(c.get("CONFIG_A"), Some(&Value::NotSet));
        assert_eq!(c.to_map().get("CONFIG_A"), Some(&&Value::NotSet));
    }

    #[test]
    fn rejects_garbage_with_line_numbers() {
        let e = parse("CONFIG_A=y\nVIRTIO=y\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.reason, "bad option name");
        assert_eq!(
            parse("CONFIG_A\n").unwrap_err().reason,
            "expected CONFIG_NAME=value"
        );
        assert_eq!(parse("CONFIG_A=\n").unwrap_err().reason, "empty value");
        assert_eq!(
            parse("CONFIG_A=\"open\n").unwrap_err().reason,
            "unterminated string value"
        );
        assert_eq!(parse("CONFIG_=y\n").unwrap_err().reason, "bad option name");
        assert_eq!(
            parse("# CONFIG_A-B is not set\n").unwrap_err().reason,
            "bad option name"
        );
        // Free comments mentioning "is not set" that do not name an option are comments.
        assert!(parse("# this is not set\n").is_ok());
    }

    #[test]
    fn check_passes_when_everything_holds() {
        let req = opts("CONFIG_64BIT=y\nCONFIG_VIRTIO=y\n# CONFIG_MODULES is not set\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=32\n");
        assert!(check(&req, &opts(DOT_CONFIG)).is_empty());
    }

    #[test]
    fn check_names_missing_and_wrongly_set_options() {
        let req = opts(
            "CONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_VSOCKETS=y\nCONFIG_EXT4_FS=y\nCONFIG_NR_CPUS=64\n# CONFIG_64BIT is not set\nCONFIG_VIRTIO=y\n",
        );
        let problems = check(&req, &opts(DOT_CONFIG));
        let names: Vec<&str> = problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "CONFIG_VIRTIO_BLK",
                "CONFIG_VIRTIO_VSOCKETS",
                "CONFIG_EXT4_FS",
                "CONFIG_NR_CPUS",
                "CONFIG_64BIT"
            ]
        );
        assert_eq!(problems[0].to_string(), "CONFIG_VIRTIO_BLK wanted y, got m");
        assert_eq!(problems[1].got, None);
        assert!(problems[1].to_string().contains("absent"));
        assert_eq!(problems[2].to_string(), "CONFIG_EXT4_FS wanted y, got n");
        assert_eq!(problems[3].to_string(), "CONFIG_NR_CPUS wanted 64, got 32");
        assert_eq!(
            problems[4].to_string(),
            "CONFIG_64BIT wanted not set, got y"
        );
    }

    #[test]
    fn not_set_requirement_accepts_absent_and_n() {
        let req = opts("# CONFIG_X is not set\nCONFIG_EXT4_FS=n\n# CONFIG_PCI is not set\n");
        assert!(check(&req, &opts(DOT_CONFIG)).is_empty());
    }

    #[test]
    fn duplicate_fragment_lines_use_the_last_value_once() {
        let req = opts("CONFIG_VIRTIO_BLK=y\nCONFIG_VIRTIO_BLK=m\n");
        assert!(check(&req, &opts(DOT_CONFIG)).is_empty());
    }

    #[test]
    fn shipped_fragment_and_base_parse() {
        let frag = opts(super::super::kernel::REQUIRED_FRAGMENT);
        let base = opts(super::super::kernel::BASE_CONFIG);
        assert!(frag.entries.len() > 30);
        // The brief's list: each must be demanded built in.
        for name in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_DEVTMPFS",
            "CONFIG_CGROUPS",
            "CONFIG_UNIX",
            "CONFIG_INET",
            "CONFIG_KVM_GUEST",
            "CONFIG_PARAVIRT_CLOCK",
            "CONFIG_PTP_1588_CLOCK_KVM",
            "CONFIG_IP_PNP",
        ] {
            assert_eq!(frag.get(name), Some(&Value::Set("y".into())), "{name}");
        }
        // The base must not contradict the fragment (the fragment is appended, so it would win,
        // but a contradiction means one of the two files is wrong).
        for (name, value) in &base.entries {
            if let Some(want) = frag.get(name) {
                assert_eq!(want, value, "{name} differs between base and fragment");
            }
        }
    }
}
