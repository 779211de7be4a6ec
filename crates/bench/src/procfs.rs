//! What the bench reads of a process from `/proc`: resident memory (`VmRSS`, `VmHWM` in
//! `/proc/<pid>/status`) and CPU time (`utime` + `stime` in `/proc/<pid>/stat`). The parsers are
//! pure; the readers only add the file access.

use anyhow::{Context, anyhow};

/// `/proc/<pid>/stat` counts CPU time in `USER_HZ` ticks, which Linux fixes at 100 for user
/// space on every architecture (`sysconf(_SC_CLK_TCK)`), whatever the kernel's own `HZ`.
const USER_HZ: f64 = 100.0;

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most that was ever resident.
    pub hwm_kib: u64,
}

impl Memory {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// `VmRSS` and `VmHWM` from the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
    })
}

/// User plus system CPU seconds from the text of `/proc/<pid>/stat`. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from the
/// last `)`: `utime` and `stime` are fields 14 and 15.
pub fn parse_stat_cpu_seconds(text: &str) -> Option<f64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The resident memory of process `pid` now.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status(&text).ok_or_else(|| anyhow!("{path} has no VmRSS or VmHWM line"))
}

/// The CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat_cpu_seconds(&text).ok_or_else(|| anyhow!("{path} does not have the stat layout"))
}

/// The CPU seconds (user + system) the calling thread has used so far.
pub fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// One line about the machine for the report: the CPU model from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| parse_cpu_model(&text))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn parse_cpu_model(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tb24eventd\nUmask:\t0022\nState:\tS (sleeping)\n\
VmPeak:\t  812344 kB\nVmSize:\t  745812 kB\nVmLck:\t       0 kB\nVmPin:\t       0 kB\n\
VmHWM:\t   24512 kB\nVmRSS:\t   18236 kB\nRssAnon:\t    6120 kB\nThreads:\t5\n";

    #[test]
    fn status_gives_rss_and_high_water_mark() {
        assert_eq!(
            parse_status(STATUS),
            Some(Memory {
                rss_kib: 18236,
                hwm_kib: 24512
            })
        );
        let m = parse_status(STATUS).unwrap();
        assert!((m.rss_mib() - 17.808).abs() < 0.001);
    }

    #[test]
    fn status_without_memory_lines_is_none() {
        // A zombie's status has no Vm* lines.
        assert_eq!(parse_status("Name:\tx\nState:\tZ (zombie)\n"), None);
        assert_eq!(parse_status("VmRSS:\t12 kB\n"), None);
        // `VmRSSX` is not `VmRSS`.
        assert_eq!(parse_status("VmRSSX:\t1 kB\nVmHWM:\t2 kB\n"), None);
    }

    #[test]
    fn stat_sums_user_and_system_ticks() {
        let stat = "4242 (b24eventd) S 1 4242 4242 0 -1 4194560 1712 0 0 0 250 37 0 0 20 0 5 0 \
123456 745812000 4559 18446744073709551615";
        assert_eq!(parse_stat_cpu_seconds(stat), Some(2.87));
    }

    #[test]
    fn stat_survives_a_command_name_with_spaces_and_parentheses() {
        let stat = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 100 100 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_cpu_seconds(stat), Some(2.0));
        assert_eq!(parse_stat_cpu_seconds("7 (short) R 1 2"), None);
        assert_eq!(parse_stat_cpu_seconds("no parenthesis"), None);
    }

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\
processor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            parse_cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(parse_cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn own_process_can_be_read() {
        let pid = std::process::id();
        assert!(memory(pid).unwrap().rss_kib > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(thread_cpu_seconds() > 0.0);
    }
}
