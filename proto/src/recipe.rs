//! Template recipes (`Wrennfile`): a Dockerfile-like text that says how to build a template.
//!
//! ```text
//! # comment
//! FROM minimal                      # optional, first; default `minimal`
//! ENV PORT=8080 GREETING="hi there"
//! USER app                          # created if missing
//! WORKDIR /srv
//! COPY site/ conf/app.toml /srv/    # sources from the build context, last word the target
//! RUN --timeout=5m make install
//! START ./server --port $PORT       # left running in the snapshot
//! HEALTHCHECK --interval=2s --timeout=1s --start-period=10s --retries=5 curl -f localhost:8080
//! ```
//!
//! Keywords are case-insensitive; a line ending in `\` continues on the next. The final
//! `USER`, `ENV` and `WORKDIR` become the template's defaults. Every error names the line
//! and the column (1-based, in characters) where it was found. Shared by ctl (which builds)
//! and the CLI (which checks a recipe before uploading its context). The parser is pure and
//! fuzzed (`fuzz/fuzz_targets/recipe.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Longest recipe, bytes.
pub const RECIPE_LEN_MAX: usize = 64 * 1024;
/// Most instructions in one recipe (each RUN/COPY is a build step with its own log).
pub const RECIPE_STEPS_MAX: usize = 256;
/// Longest timeout a RUN, HEALTHCHECK option may ask for (a build is bounded as a whole
/// too).
pub const RECIPE_TIMEOUT_MAX: Duration = Duration::from_secs(6 * 3600);
/// Most HEALTHCHECK retries.
pub const HEALTHCHECK_RETRIES_MAX: u32 = 100;
/// Longest user name (as `useradd` accepts).
pub const USER_LEN_MAX: usize = 32;

/// A parsed recipe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recipe {
    /// The template to start from (`minimal` when no FROM).
    pub from: String,
    /// Steps in order (FROM, START and HEALTHCHECK are not steps).
    pub steps: Vec<Step>,
    /// Defaults of the resulting template: the final ENV, USER and WORKDIR.
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start: Option<Located<String>>,
    pub healthcheck: Option<Located<Healthcheck>>,
}

/// Something with the line it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub line: usize,
    pub value: T,
}

/// One build step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Run {
        line: usize,
        cmd: String,
        timeout: Option<Duration>,
    },
    Copy {
        line: usize,
        sources: Vec<String>,
        target: String,
    },
    Env {
        line: usize,
        vars: Vec<(String, String)>,
    },
    Workdir {
        line: usize,
        dir: String,
    },
    User {
        line: usize,
        name: String,
    },
}

/// HEALTHCHECK's command and timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Healthcheck {
    pub cmd: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub retries: u32,
}

impl Default for Healthcheck {
    fn default() -> Self {
        Healthcheck {
            cmd: String::new(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            start_period: Duration::ZERO,
            retries: 3,
        }
    }
}

/// A recipe error: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipeError {
    /// 1-based line of the physical line where the problem is.
    pub line: usize,
    /// 1-based column (characters) in that line.
    pub column: usize,
    pub kind: ErrorKind,
}

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    TooLong {
        len: usize,
    },
    TooManySteps,
    NotUtf8,
    /// NUL or another control character (tabs are fine).
    ControlCharacter,
    UnknownInstruction(String),
    /// The instruction needs an argument.
    Missing(&'static str),
    FromNotFirst,
    Duplicate(&'static str),
    UnknownOption(String),
    BadOption {
        option: String,
        why: String,
    },
    BadEnv(String),
    BadUser(String),
    BadPath(String),
    /// A `\` on the last line.
    DanglingContinuation,
    Unterminated,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::TooLong { len } => {
                write!(f, "recipe is {len} bytes, more than {RECIPE_LEN_MAX}")
            }
            ErrorKind::TooManySteps => write!(f, "more than {RECIPE_STEPS_MAX} instructions"),
            ErrorKind::NotUtf8 => f.write_str("recipe is not UTF-8"),
            ErrorKind::ControlCharacter => f.write_str("control character"),
            ErrorKind::UnknownInstruction(w) => write!(
                f,
                "unknown instruction {w:?} (FROM, RUN, COPY, ENV, WORKDIR, USER, START, HEALTHCHECK)"
            ),
            ErrorKind::Missing(what) => write!(f, "missing {what}"),
            ErrorKind::FromNotFirst => f.write_str("FROM must be the first instruction"),
            ErrorKind::Duplicate(i) => write!(f, "{i} may appear only once"),
            ErrorKind::UnknownOption(o) => write!(f, "unknown option {o:?}"),
            ErrorKind::BadOption { option, why } => write!(f, "{option}: {why}"),
            ErrorKind::BadEnv(why) => write!(f, "ENV: {why}"),
            ErrorKind::BadUser(why) => write!(f, "USER: {why}"),
            ErrorKind::BadPath(why) => write!(f, "{why}"),
            ErrorKind::DanglingContinuation => f.write_str("line continuation at the end of the recipe"),
            ErrorKind::Unterminated => f.write_str("unterminated quote"),
        }
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.kind
        )
    }
}

impl std::error::Error for RecipeError {}

/// A logical line: its text with each character's (line, column) of origin.
struct Logical {
    chars: Vec<(char, usize, usize)>,
}

impl Logical {
    fn at(&self, i: usize) -> (usize, usize) {
        match self.chars.get(i) {
            Some(&(_, l, c)) => (l, c),
            None => self
                .chars
                .last()
                .map(|&(_, l, c)| (l, c + 1))
                .unwrap_or((1, 1)),
        }
    }
    fn err(&self, i: usize, kind: ErrorKind) -> RecipeError {
        let (line, column) = self.at(i);
        RecipeError { line, column, kind }
    }
    fn text(&self, from: usize, to: usize) -> String {
        self.chars[from..to].iter().map(|c| c.0).collect()
    }
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Joins continued lines; drops comments and blank lines.
fn logical_lines(text: &str) -> Result<Vec<Logical>, RecipeError> {
    let mut out = Vec::new();
    let mut cur: Vec<(char, usize, usize)> = Vec::new();
    let mut continued = false;
    let mut last_line = 1;
    for (n, raw) in text.split('\n').enumerate() {
        let line = n + 1;
        last_line = line;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let chars: Vec<char> = raw.chars().collect();
        if let Some(col) = chars.iter().position(|&c| c != '\t' && c.is_control()) {
            return Err(RecipeError {
                line,
                column: col + 1,
                kind: ErrorKind::ControlCharacter,
            });
        }
        let first = chars.iter().position(|&c| !is_space(c));
        // A comment or blank line: skipped, also inside a continuation (as Docker does).
        if first.is_none_or(|i| chars[i] == '#') {
            continue;
        }
        let mut end = chars.len();
        while end > 0 && is_space(chars[end - 1]) {
            end -= 1;
        }
        let cont = end > 0 && chars[end - 1] == '\\';
        if cont {
            end -= 1;
        }
        let start = if continued { 0 } else { first.unwrap_or(0) };
        for (i, &c) in chars.iter().enumerate().take(end).skip(start) {
            cur.push((c, line, i + 1));
        }
        if cont {
            cur.push((' ', line, end + 1));
            continued = true;
        } else {
            out.push(Logical {
                chars: std::mem::take(&mut cur),
            });
            continued = false;
        }
    }
    if continued {
        return Err(RecipeError {
            line: last_line,
            column: 1,
            kind: ErrorKind::DanglingContinuation,
        });
    }
    Ok(out)
}

/// Words of `l` from index `i`: `(start, end, text)`, split on spaces, with double quotes
/// grouping and `\"` / `\\` escapes inside them.
fn words(l: &Logical, mut i: usize) -> Result<Vec<(usize, String)>, RecipeError> {
    let mut out = Vec::new();
    let n = l.chars.len();
    loop {
        while i < n && is_space(l.chars[i].0) {
            i += 1;
        }
        if i >= n {
            return Ok(out);
        }
        let start = i;
        let mut w = String::new();
        while i < n && !is_space(l.chars[i].0) {
            let c = l.chars[i].0;
            if c == '"' {
                let open = i;
                i += 1;
                loop {
                    match l.chars.get(i).map(|c| c.0) {
                        None => return Err(l.err(open, ErrorKind::Unterminated)),
                        Some('"') => break,
                        Some('\\')
                            if matches!(l.chars.get(i + 1).map(|c| c.0), Some('"' | '\\')) =>
                        {
                            w.push(l.chars[i + 1].0);
                            i += 2;
                        }
                        Some(c) => {
                            w.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
            } else {
                w.push(c);
                i += 1;
            }
        }
        out.push((start, w));
    }
}

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.len() > 9 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    };
    (!d.is_zero() && d <= RECIPE_TIMEOUT_MAX).then_some(d)
}

/// Leading `--name=value` options of an instruction; returns them and the index where the
/// rest begins.
fn options(l: &Logical, mut i: usize) -> (Vec<(usize, String, String)>, usize) {
    let n = l.chars.len();
    let mut out = Vec::new();
    loop {
        while i < n && is_space(l.chars[i].0) {
            i += 1;
        }
        if i + 1 >= n || l.chars[i].0 != '-' || l.chars[i + 1].0 != '-' {
            return (out, i);
        }
        let start = i;
        while i < n && !is_space(l.chars[i].0) {
            i += 1;
        }
        let word = l.text(start, i);
        let (name, value) = match word.split_once('=') {
            Some((a, b)) => (a.to_owned(), b.to_owned()),
            None => (word, String::new()),
        };
        out.push((start, name, value));
    }
}

fn duration_opt(l: &Logical, at: usize, name: &str, v: &str) -> Result<Duration, RecipeError> {
    parse_duration(v).ok_or_else(|| {
        l.err(
            at,
            ErrorKind::BadOption {
                option: name.to_owned(),
                why: format!(
                    "{v:?} is not a duration (e.g. 500ms, 30s, 5m, 1h; at most {} h)",
                    RECIPE_TIMEOUT_MAX.as_secs() / 3600
                ),
            },
        )
    })
}

/// The rest of the line from `i`, trimmed; `Missing` when empty.
fn rest(l: &Logical, i: usize, what: &'static str) -> Result<String, RecipeError> {
    let s = l.text(i.min(l.chars.len()), l.chars.len());
    let s = s.trim();
    if s.is_empty() {
        return Err(l.err(i, ErrorKind::Missing(what)));
    }
    Ok(s.to_owned())
}

fn check_env_key(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn check_user(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > USER_LEN_MAX {
        return Err(format!("a user name is 1 to {USER_LEN_MAX} characters"));
    }
    let mut c = u.chars();
    let first_ok = c.next().is_some_and(|f| f.is_ascii_lowercase() || f == '_');
    if !first_ok || !c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == '_' || x == '-')
    {
        return Err(format!(
            "{u:?} is not a user name (lower-case letters, digits, _ and -, not first a digit or -)"
        ));
    }
    Ok(())
}

fn check_context_path(p: &str) -> Result<(), String> {
    if p.starts_with('/') {
        return Err(format!(
            "COPY source {p:?} must be relative to the build context"
        ));
    }
    if p.split('/').any(|s| s == "..") {
        return Err(format!("COPY source {p:?} leaves the build context"));
    }
    Ok(())
}

/// Parses a recipe.
pub fn parse(bytes: &[u8]) -> Result<Recipe, RecipeError> {
    if bytes.len() > RECIPE_LEN_MAX {
        return Err(RecipeError {
            line: 1,
            column: 1,
            kind: ErrorKind::TooLong { len: bytes.len() },
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let before = &bytes[..e.valid_up_to()];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        RecipeError {
            line,
            column,
            kind: ErrorKind::NotUtf8,
        }
    })?;
    let mut r = Recipe {
        from: "minimal".into(),
        ..Recipe::default()
    };
    let mut seen_any = false;
    for l in logical_lines(text)? {
        let n = l.chars.len();
        let kw_end = (0..n).find(|&i| is_space(l.chars[i].0)).unwrap_or(n);
        let kw = l.text(0, kw_end).to_ascii_uppercase();
        let line = l.at(0).0;
        let first = !seen_any;
        seen_any = true;
        if r.steps.len() >= RECIPE_STEPS_MAX {
            return Err(l.err(0, ErrorKind::TooManySteps));
        }
        match kw.as_str() {
            "FROM" => {
                if !first {
                    return Err(l.err(0, ErrorKind::FromNotFirst));
                }
                let w = words(&l, kw_end)?;
                match w.as_slice() {
                    [] => return Err(l.err(kw_end, ErrorKind::Missing("template name"))),
                    // `FROM ""` is no name (the fuzzer found it accepted as one).
                    [(at, t)] if t.is_empty() => {
                        return Err(l.err(*at, ErrorKind::Missing("template name")))
                    }
                    [(_, t)] => r.from = t.clone(),
                    [_, (at, _), ..] => {
                        return Err(l.err(*at, ErrorKind::BadPath("FROM takes one template".into())))
                    }
                }
            }
            "RUN" => {
                let (opts, i) = options(&l, kw_end);
                let mut timeout = None;
                for (at, name, v) in opts {
                    match name.as_str() {
                        "--timeout" => timeout = Some(duration_opt(&l, at, &name, &v)?),
                        _ => return Err(l.err(at, ErrorKind::UnknownOption(name))),
                    }
                }
                let cmd = rest(&l, i, "command")?;
                r.steps.push(Step::Run { line, cmd, timeout });
            }
            "COPY" => {
                let w = words(&l, kw_end)?;
                if w.len() < 2 {
                    let at = w.first().map_or(kw_end, |x| x.0);
                    return Err(l.err(at, ErrorKind::Missing("a source and a target")));
                }
                let (targets, sources) = w
                    .split_last()
                    .map(|(t, s)| (t.clone(), s.to_vec()))
                    .unwrap_or_default();
                for (at, s) in &sources {
                    check_context_path(s).map_err(|why| l.err(*at, ErrorKind::BadPath(why)))?;
                }
                if let Some((at, _)) = w.iter().find(|(_, p)| p.is_empty()) {
                    return Err(l.err(*at, ErrorKind::BadPath("COPY: an empty path".into())));
                }
                r.steps.push(Step::Copy {
                    line,
                    sources: sources.into_iter().map(|x| x.1).collect(),
                    target: targets.1,
                });
            }
            "ENV" => {
                let w = words(&l, kw_end)?;
                if w.is_empty() {
                    return Err(l.err(kw_end, ErrorKind::Missing("KEY=VALUE")));
                }
                let mut vars = Vec::new();
                for (at, pair) in w {
                    let Some((k, v)) = pair.split_once('=') else {
                        return Err(
                            l.err(at, ErrorKind::BadEnv(format!("{pair:?} is not KEY=VALUE")))
                        );
                    };
                    if !check_env_key(k) {
                        return Err(l.err(
                            at,
                            ErrorKind::BadEnv(format!("{k:?} is not a variable name")),
                        ));
                    }
                    r.env.insert(k.to_owned(), v.to_owned());
                    vars.push((k.to_owned(), v.to_owned()));
                }
                r.steps.push(Step::Env { line, vars });
            }
            "WORKDIR" => {
                let w = words(&l, kw_end)?;
                let Some((at, dir)) = w.first().cloned() else {
                    return Err(l.err(kw_end, ErrorKind::Missing("directory")));
                };
                if w.len() > 1 {
                    return Err(l.err(
                        w[1].0,
                        ErrorKind::BadPath("WORKDIR takes one directory".into()),
                    ));
                }
                if !dir.starts_with('/') {
                    return Err(l.err(
                        at,
                        ErrorKind::BadPath(format!("WORKDIR {dir:?} must be absolute")),
                    ));
                }
                r.workdir = Some(dir.clone());
                r.steps.push(Step::Workdir { line, dir });
            }
            "USER" => {
                let w = words(&l, kw_end)?;
                let Some((at, name)) = w.first().cloned() else {
                    return Err(l.err(kw_end, ErrorKind::Missing("user name")));
                };
                if w.len() > 1 {
                    return Err(l.err(w[1].0, ErrorKind::BadUser("USER takes one name".into())));
                }
                check_user(&name).map_err(|why| l.err(at, ErrorKind::BadUser(why)))?;
                r.user = Some(name.clone());
                r.steps.push(Step::User { line, name });
            }
            "START" => {
                if r.start.is_some() {
                    return Err(l.err(0, ErrorKind::Duplicate("START")));
                }
                let cmd = rest(&l, kw_end, "command")?;
                r.start = Some(Located { line, value: cmd });
            }
            "HEALTHCHECK" => {
                if r.healthcheck.is_some() {
                    return Err(l.err(0, ErrorKind::Duplicate("HEALTHCHECK")));
                }
                let (opts, i) = options(&l, kw_end);
                let mut h = Healthcheck::default();
                for (at, name, v) in opts {
                    match name.as_str() {
                        "--interval" => h.interval = duration_opt(&l, at, &name, &v)?,
                        "--timeout" => h.timeout = duration_opt(&l, at, &name, &v)?,
                        "--start-period" => h.start_period = duration_opt(&l, at, &name, &v)?,
                        "--retries" => {
                            h.retries = v
                                .parse::<u32>()
                                .ok()
                                .filter(|n| (1..=HEALTHCHECK_RETRIES_MAX).contains(n))
                                .ok_or_else(|| {
                                    l.err(
                                        at,
                                        ErrorKind::BadOption {
                                            option: name.clone(),
                                            why: format!(
                                                "{v:?} is not 1 to {HEALTHCHECK_RETRIES_MAX}"
                                            ),
                                        },
                                    )
                                })?
                        }
                        _ => return Err(l.err(at, ErrorKind::UnknownOption(name))),
                    }
                }
                h.cmd = rest(&l, i, "command")?;
                r.healthcheck = Some(Located { line, value: h });
            }
            _ => return Err(l.err(0, ErrorKind::UnknownInstruction(l.text(0, kw_end)))),
        }
    }
    Ok(r)
}

/// Fuzz entry point (`fuzz/fuzz_targets/recipe.rs`): any bytes never panic; an error's
/// position lies inside the input (line within the lines, column at most one past the
/// line's end); what parses has at most [`RECIPE_STEPS_MAX`] steps.
pub fn fuzz_parse(data: &[u8]) {
    match parse(data) {
        Ok(r) => {
            assert!(r.steps.len() <= RECIPE_STEPS_MAX);
            assert!(!r.from.is_empty());
        }
        Err(e) => {
            assert!(e.line >= 1 && e.column >= 1);
            if !matches!(e.kind, ErrorKind::TooLong { .. }) {
                let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
                assert!(e.line <= lines.len(), "{e}");
                let len = String::from_utf8_lossy(lines[e.line - 1]).chars().count();
                assert!(e.column <= len + 1, "{e} in a line of {len}");
            }
            assert!(!e.to_string().is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> (usize, usize, String) {
        let e = parse(s.as_bytes()).unwrap_err();
        fuzz_parse(s.as_bytes());
        (e.line, e.column, e.kind.to_string())
    }

    #[test]
    fn a_full_recipe() {
        let text = "# a server\n\
            FROM base-tpl\n\
            ENV PORT=8080 GREETING=\"hi there\"\n\
            user app\n\
            WORKDIR /srv\n\
            COPY site/ conf/app.toml /srv/\n\
            RUN --timeout=5m make \\\n    install\n\
            \n\
            START ./server --port $PORT\n\
            HEALTHCHECK --interval=2s --timeout=1s --start-period=10s --retries=5 curl -f localhost:8080\n\
            ENV PORT=9090\n";
        let r = parse(text.as_bytes()).unwrap();
        assert_eq!(r.from, "base-tpl");
        assert_eq!(r.env["PORT"], "9090", "the final ENV is the default");
        assert_eq!(r.env["GREETING"], "hi there");
        assert_eq!(r.user.as_deref(), Some("app"));
        assert_eq!(r.workdir.as_deref(), Some("/srv"));
        assert_eq!(r.steps.len(), 6);
        assert_eq!(
            r.steps[3],
            Step::Copy {
                line: 6,
                sources: vec!["site/".into(), "conf/app.toml".into()],
                target: "/srv/".into()
            }
        );
        assert_eq!(
            r.steps[4],
            Step::Run {
                line: 7,
                cmd: "make      install".into(),
                timeout: Some(Duration::from_secs(300))
            }
        );
        let s = r.start.unwrap();
        assert_eq!((s.line, s.value.as_str()), (10, "./server --port $PORT"));
        let h = r.healthcheck.unwrap().value;
        assert_eq!(h.cmd, "curl -f localhost:8080");
        assert_eq!(
            (h.interval, h.timeout, h.retries),
            (Duration::from_secs(2), Duration::from_secs(1), 5)
        );
        assert_eq!(h.start_period, Duration::from_secs(10));
        // Defaults.
        let r = parse(b"RUN true").unwrap();
        assert_eq!(r.from, "minimal");
        assert!(r.healthcheck.is_none() && r.start.is_none());
        assert_eq!(parse(b"").unwrap().steps.len(), 0);
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(err("RUN true\n  FORM x\n").0, 2);
        assert_eq!(err("RUN true\n  FORM x\n").1, 3);
        assert!(err("RUN true\n  FORM x\n")
            .2
            .contains("unknown instruction \"FORM\""));
        assert_eq!(
            err("RUN true\nFROM x\n"),
            (2, 1, "FROM must be the first instruction".into())
        );
        assert_eq!(
            err("RUN --timeout=5y x"),
            (
                1,
                5,
                "--timeout: \"5y\" is not a duration (e.g. 500ms, 30s, 5m, 1h; at most 6 h)".into()
            )
        );
        assert_eq!(err("RUN --tmeout=5s x").1, 5);
        assert_eq!(err("RUN --timeout=5s").2, "missing command");
        assert_eq!(err("RUN --timeout=5s").1, 17);
        assert_eq!(
            err("ENV A=1 9B=2"),
            (1, 9, "ENV: \"9B\" is not a variable name".into())
        );
        assert_eq!(err("ENV A=\"x"), (1, 7, "unterminated quote".into()));
        assert_eq!(err("ENV NOEQ").1, 5);
        assert_eq!(err("COPY /etc/passwd /x").1, 6);
        assert!(err("COPY a/../../b /x")
            .2
            .contains("leaves the build context"));
        assert_eq!(err("COPY onlyone").2, "missing a source and a target");
        // Found by the fuzzer: quotes around nothing are no name and no path.
        assert_eq!(
            err("FROM \"\"\"\"\n#x"),
            (1, 6, "missing template name".into())
        );
        assert_eq!(err("COPY a \"\""), (1, 8, "COPY: an empty path".into()));
        assert_eq!(err("WORKDIR rel").2, "WORKDIR \"rel\" must be absolute");
        assert_eq!(err("USER Root").1, 6);
        assert_eq!(err("START a\nSTART b").0, 2);
        assert_eq!(err("HEALTHCHECK --retries=0 x").1, 13);
        assert_eq!(
            err("RUN a \\\n  --x \\\n").2,
            "line continuation at the end of the recipe"
        );
        // The column of an error on a continued line is that of its physical line.
        assert_eq!(
            err("ENV A=1 \\\n   B=2 3C=4"),
            (2, 8, "ENV: \"3C\" is not a variable name".into())
        );
        assert_eq!(err("RUN a\nRUN b\u{0}"), (2, 6, "control character".into()));
        assert_eq!(err("RUN é\n\u{ff}").0, 2);
        let bad_utf8 = [b'R', b'U', b'N', b' ', 0xc3, 0x28];
        let e = parse(&bad_utf8).unwrap_err();
        assert_eq!((e.line, e.column, e.kind), (1, 5, ErrorKind::NotUtf8));
        let long = vec![b'#'; RECIPE_LEN_MAX + 1];
        assert!(matches!(
            parse(&long).unwrap_err().kind,
            ErrorKind::TooLong { .. }
        ));
        let many = "RUN x\n".repeat(RECIPE_STEPS_MAX + 1);
        assert_eq!(
            err(&many),
            (
                RECIPE_STEPS_MAX + 1,
                1,
                format!("more than {RECIPE_STEPS_MAX} instructions")
            )
        );
    }

    #[test]
    fn a_seeded_generator_never_panics() {
        // Mutations of a valid recipe: every byte position replaced by interesting bytes.
        let seed: u64 = std::env::var("WRENN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(17);
        println!("seed {seed}");
        let base = b"FROM x\nENV A=\"b c\" D=e\nRUN --timeout=1s a \\\n b\nCOPY s /t\nHEALTHCHECK --retries=2 c\n";
        let mut x = seed;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut v = base.to_vec();
            let pos = (x as usize) % v.len();
            let b = [b'\\', b'"', b'\n', b' ', b'=', b'-', 0, 0xff, b'#'][(x >> 32) as usize % 9];
            v[pos] = b;
            if x & 1 == 0 {
                v.truncate(((x >> 40) as usize) % v.len());
            }
            fuzz_parse(&v);
        }
    }
}
