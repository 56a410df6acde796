//! Resource usage of the guest from /proc and statvfs, for `Metrics.Get`.

use proto::gen::wrenn::envd::v1::GetMetricsResponse;

/// Fields from /proc/stat's first line in clock ticks: user, nice, system, idle, iowait,
/// irq, softirq, steal.
pub fn parse_cpu_line(stat: &str) -> Option<[u64; 8]> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let mut v = [0u64; 8];
    let mut it = line.split_whitespace().skip(1);
    for x in v.iter_mut() {
        *x = it.next()?.parse().ok()?;
    }
    Some(v)
}

/// A value in kB from /proc/meminfo, in bytes.
pub fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.split(':').next() == Some(key))?;
    let kb: u64 = line
        .split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A sample of CPU, memory, disk and process counts. Clock and API fields are left zero
/// for the caller.
pub fn sample() -> GetMetricsResponse {
    let mut m = GetMetricsResponse {
        now_unix_ns: crate::clock::now_unix_ns(),
        ..Default::default()
    };
    // SAFETY: sysconf takes an integer.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: sysconf takes an integer.
    m.cpu_count = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u32;
    if let Some(c) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu_line(&s))
    {
        let ns = |t: u64| t.saturating_mul(1_000_000_000 / hz);
        m.cpu_user_ns = ns(c[0]);
        m.cpu_system_ns = ns(c[2]);
        m.cpu_idle_ns = ns(c[3] + c[4]);
        m.cpu_other_ns = ns(c[1] + c[5] + c[6] + c[7]);
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        m.load_avg_1m = l
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
    }
    if let Ok(mi) = std::fs::read_to_string("/proc/meminfo") {
        m.memory_total_bytes = meminfo_bytes(&mi, "MemTotal").unwrap_or(0);
        m.memory_available_bytes = meminfo_bytes(&mi, "MemAvailable").unwrap_or(0);
    }
    // SAFETY: statvfs is plain data.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs buffer.
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut vfs) } == 0 {
        let f = vfs.f_frsize as u64;
        m.disk_total_bytes = vfs.f_blocks as u64 * f;
        m.disk_used_bytes = (vfs.f_blocks as u64).saturating_sub(vfs.f_bfree as u64) * f;
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        m.process_count = rd
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .count() as u32;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some([10, 1, 20, 300, 4, 5, 6, 7]));
        assert_eq!(parse_cpu_line("cpu 1 2\n"), None);
        assert_eq!(parse_cpu_line("garbage"), None);
        let mi = "MemTotal:       16000 kB\nMemAvailable:    8000 kB\n";
        assert_eq!(meminfo_bytes(mi, "MemTotal"), Some(16000 * 1024));
        assert_eq!(meminfo_bytes(mi, "MemFree"), None);
    }

    #[test]
    fn live_sample() {
        let m = sample();
        assert!(m.cpu_count >= 1);
        assert!(m.memory_total_bytes > 0);
        assert!(m.disk_total_bytes > 0);
        assert!(m.process_count >= 1);
    }
}
