//! CPU accounting from /proc: this process, the server measured, the machine's idle time.

use super::*;

// ---------------------------------------------------------------- CPU accounting

/// CPU used over an interval, in cores (CPU seconds per second): by this process (the load
/// generator, or baseline B, which runs in it), by the server process measured (A or the
/// hub), and left idle on the whole machine.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) bench: f64,
    pub(crate) server: f64,
    pub(crate) idle: f64,
}

/// CPU seconds (user + system, all threads) a process has used, from `/proc/<pid>/stat`
/// (`pid` "self" for this one). The kernel counts them in USER_HZ ticks, 100 a second.
pub(crate) fn process_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(cpu_ticks(&stat)? as f64 / 100.0)
}

/// utime + stime from a `/proc/<pid>/stat` line.
pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name, which may hold spaces and parentheses: state (field
    // 3) first, so utime and stime (fields 14 and 15) are the 12th and 13th.
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Seconds all cores together have spent idle (idle and iowait), from `/proc/stat`.
pub(crate) fn machine_idle_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some((f.get(3)? + f.get(4)?) as f64 / 100.0)
}

/// Starts counting CPU for this process, `server` (a pid) and the machine.
pub(crate) struct CpuMeter {
    pub(crate) at: Instant,
    pub(crate) server: Option<u32>,
    pub(crate) start: Option<(f64, f64, f64)>,
}

impl CpuMeter {
    pub(crate) fn start(server: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server,
            start: Self::read(server),
        }
    }

    pub(crate) fn read(server: Option<u32>) -> Option<(f64, f64, f64)> {
        let server = match server {
            Some(pid) => process_cpu_secs(&pid.to_string())?,
            None => 0.0,
        };
        Some((process_cpu_secs("self")?, server, machine_idle_secs()?))
    }

    /// CPU seconds this process used since `start`.
    pub(crate) fn bench_secs(&self) -> Option<f64> {
        Some(process_cpu_secs("self")? - self.start?.0)
    }

    /// The CPU used since `start`, or None where /proc could not be read.
    pub(crate) fn stop(&self) -> Option<Cpu> {
        let (b0, s0, i0) = self.start?;
        let (b1, s1, i1) = Self::read(self.server)?;
        let secs = self.at.elapsed().as_secs_f64();
        Some(Cpu {
            bench: (b1 - b0) / secs,
            server: (s1 - s0) / secs,
            idle: (i1 - i0) / secs,
        })
    }
}

/// Runs `f` with its CPU counted (`server`: the pid of the process it loads).
pub(crate) async fn metered(
    server: Option<u32>,
    f: impl std::future::Future<Output = anyhow::Result<Measured>>,
) -> anyhow::Result<Measured> {
    let meter = CpuMeter::start(server);
    let mut m = f.await?;
    m.cpu = meter.stop();
    Ok(m)
}
