//! `wrenn sandbox metrics` and `wrenn team usage`: ranges, sparklines and tables.

#![forbid(unsafe_code)]

use proto::gen::wrenn::ctl::v1 as pb;

use super::table::{bytes, Table};

/// Parses a range: `90`, `90s`, `10m`, `2h`, `1d` (seconds, at most a day).
pub fn parse_range(s: &str) -> Result<u32, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u32 = num.parse().map_err(|_| {
        format!("--range {s:?}: expected a number and a unit (s, m, h, d), e.g. 10m")
    })?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("--range {s:?}: unit must be s, m, h or d")),
    };
    let secs = n
        .checked_mul(mul)
        .filter(|v| (1..=86_400).contains(v))
        .ok_or_else(|| format!("--range {s:?}: must be between 1s and 1d"))?;
    Ok(secs)
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A sparkline of `v` squeezed (by averaging) into at most `width` characters, scaled to
/// the largest value.
pub fn sparkline(v: &[f64], width: usize) -> String {
    if v.is_empty() || width == 0 {
        return String::new();
    }
    let per = v.len().div_ceil(width);
    let pts: Vec<f64> = v
        .chunks(per)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    let max = pts.iter().copied().fold(0.0f64, f64::max);
    pts.iter()
        .map(|&x| {
            if max <= 0.0 {
                BARS[0]
            } else {
                let i = ((x / max) * (BARS.len() - 1) as f64).round() as usize;
                BARS[i.min(BARS.len() - 1)]
            }
        })
        .collect()
}

/// The human view of `Sandboxes/Metrics`.
pub fn metrics_human(r: &pb::SandboxMetricsResponse) -> String {
    if r.samples.is_empty() {
        return format!("no samples ({})\n", r.source);
    }
    let secs = |s: &pb::UsageSample| f64::from(s.step_s.max(1));
    let cpu: Vec<f64> = r
        .samples
        .iter()
        .map(|s| s.cpu_usec as f64 / 1e4 / secs(s))
        .collect();
    let mem: Vec<f64> = r.samples.iter().map(|s| s.memory_bytes as f64).collect();
    let rx: Vec<f64> = r
        .samples
        .iter()
        .map(|s| s.net_rx_bytes as f64 / secs(s))
        .collect();
    let tx: Vec<f64> = r
        .samples
        .iter()
        .map(|s| s.net_tx_bytes as f64 / secs(s))
        .collect();
    let last = r.samples.last().map(|s| s.disk_bytes).unwrap_or(0);
    let mut t = Table::new(&["METRIC", "LAST", "MAX", "TREND"]);
    let max = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
    let lastv = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    t.row(vec![
        "cpu %".into(),
        format!("{:.1}", lastv(&cpu)),
        format!("{:.1}", max(&cpu)),
        sparkline(&cpu, 60),
    ]);
    t.row(vec![
        "memory".into(),
        bytes(lastv(&mem) as u64),
        bytes(max(&mem) as u64),
        sparkline(&mem, 60),
    ]);
    t.row(vec![
        "net rx/s".into(),
        bytes(lastv(&rx) as u64),
        bytes(max(&rx) as u64),
        sparkline(&rx, 60),
    ]);
    t.row(vec![
        "net tx/s".into(),
        bytes(lastv(&tx) as u64),
        bytes(max(&tx) as u64),
        sparkline(&tx, 60),
    ]);
    t.row(vec![
        "disk".into(),
        bytes(last),
        String::new(),
        String::new(),
    ]);
    format!(
        "{} samples, {} s each, from the {}\n{}",
        r.samples.len(),
        r.step_s,
        r.source,
        t.render()
    )
}

/// The human view of `Teams/Usage`.
pub fn usage_human(r: &pb::TeamUsageResponse) -> String {
    let mut t = Table::new(&["DAY", "SANDBOX-S", "CPU-S", "MEMORY-MIB-S", "UNSAMPLED-S"]);
    for d in &r.days {
        t.row(vec![
            d.day.clone(),
            format!("{:.0}", d.sandbox_seconds),
            format!("{:.1}", d.cpu_seconds),
            format!("{:.0}", d.memory_mib_seconds),
            format!("{:.0}", d.unsampled_seconds),
        ]);
    }
    t.render()
}

/// `webhook create`: the webhook and its secret, which is shown only here.
pub fn webhook_created_human(r: &pb::CreateWebhookResponse) -> String {
    let w = r.webhook.clone().unwrap_or_default();
    format!(
        "webhook  {}\nurl      {}\nevents   {}\nsecret   {}\n(the secret is shown only now: verify each delivery's Wrenn-Signature with it)\n",
        w.id,
        w.url,
        if w.events.is_empty() { "all".to_owned() } else { w.events.join(",") },
        r.secret
    )
}

pub fn webhooks_table(list: &[pb::Webhook]) -> String {
    let mut t = Table::new(&["ID", "URL", "EVENTS", "CREATED"]);
    for w in list {
        t.row(vec![
            w.id.clone(),
            w.url.clone(),
            if w.events.is_empty() {
                "all".into()
            } else {
                w.events.join(",")
            },
            super::table::time(w.created_unix_ns),
        ]);
    }
    t.render()
}

pub fn deliveries_table(list: &[pb::Delivery]) -> String {
    let mut t = Table::new(&[
        "EVENT", "TYPE", "STATUS", "ATTEMPTS", "HTTP", "ERROR", "CREATED",
    ]);
    for d in list {
        t.row(vec![
            d.event_id.clone(),
            d.event_type.clone(),
            d.status.clone(),
            d.attempts.to_string(),
            if d.last_http_status == 0 {
                "-".into()
            } else {
                d.last_http_status.to_string()
            },
            d.last_error.clone(),
            super::table::time(d.created_unix_ns),
        ]);
    }
    t.render()
}

/// `wrenn template check FILE`: 0 and the steps, or 1 and `FILE:LINE:COLUMN: error`.
/// (Plain text only, `--json` included: the CLI's JSON writer renders API messages.)
pub fn check_recipe(path: &str) -> Result<u8, super::CliError> {
    use proto::recipe::{parse, Step, RECIPE_LEN_MAX};
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(RECIPE_LEN_MAX as u64 + 1).read_to_end(&mut bytes))
        .map_err(|source| super::CliError::Io {
            action: format!("read {path}"),
            source,
        })?;
    let r = match parse(&bytes) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{path}:{}:{}: {}", e.line, e.column, e.kind);
            return Ok(1);
        }
    };
    let mut out = format!("from {}\n", r.from);
    for (i, s) in r.steps.iter().enumerate() {
        let (line, what) = match s {
            Step::Run { line, cmd, .. } => (line, format!("RUN {cmd}")),
            Step::Copy {
                line,
                sources,
                target,
            } => (line, format!("COPY {} -> {target}", sources.join(" "))),
            Step::Env { line, vars } => (
                line,
                format!(
                    "ENV {}",
                    vars.iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ),
            Step::Workdir { line, dir } => (line, format!("WORKDIR {dir}")),
            Step::User { line, name } => (line, format!("USER {name}")),
        };
        out.push_str(&format!("{:>3}. line {line}: {what}\n", i + 1));
    }
    if let Some(s) = &r.start {
        out.push_str(&format!("start (line {}): {}\n", s.line, s.value));
    }
    if let Some(h) = &r.healthcheck {
        out.push_str(&format!("healthcheck (line {}): {}\n", h.line, h.value.cmd));
    }
    print!("{out}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("10m"), Ok(600));
        assert_eq!(parse_range("90"), Ok(90));
        assert_eq!(parse_range("2h"), Ok(7200));
        assert_eq!(parse_range("1d"), Ok(86_400));
        assert!(parse_range("2d").is_err());
        assert!(parse_range("0s").is_err());
        assert!(parse_range("m").is_err());
        assert!(parse_range("5w").is_err());
        assert!(parse_range("99999999999h").is_err());
    }

    #[test]
    fn sparklines() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 7.0], 10), "▁▂▃█");
        assert_eq!(sparkline(&[0.0; 3], 10), "▁▁▁");
        assert_eq!(sparkline(&[1.0; 100], 10).chars().count(), 10);
        assert_eq!(sparkline(&[], 10), "");
    }
}
