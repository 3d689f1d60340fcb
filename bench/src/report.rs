//! The report: rows, the machine, CPU rows.

use super::*;

pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) value: String,
    pub(crate) baseline: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} memory")
}

/// The CPU rows: what a unary call costs the load generator and the server, against A and
/// B; the unary rate the baselines' own CPU costs leave room for on this machine; and the
/// CPU per rating of batches against B's. Empty where /proc could not be read.
/// `raw_unary`: B at the unary group size, B with every caller's rating in one batch, and
/// the number of callers; `prep`: the hub's CPU per rating to validate and seal it
/// ([`preparation_cpu_micros`]).
pub(crate) fn cpu_rows(
    echo: &Measured,
    unary: &Measured,
    (raw_unary, raw_all, callers): (&Measured, &Measured, usize),
    batched: &Measured,
    raw: &Measured,
    prep: Option<f64>,
) -> Vec<Row> {
    let bench = |c: &Cpu| c.bench;
    let server = |c: &Cpu| c.server;
    let (
        Some(a_load),
        Some(a_server),
        Some(hub_load),
        Some(hub),
        Some(b32),
        Some(b_all),
        Some(hub_batch),
        Some(b100),
        Some(prep),
    ) = (
        echo.cpu_micros(bench),
        echo.cpu_micros(server),
        unary.cpu_micros(bench),
        unary.cpu_micros(server),
        raw_unary.cpu_micros(bench),
        raw_all.cpu_micros(bench),
        batched.cpu_micros(server),
        raw.cpu_micros(bench),
        prep,
    )
    else {
        return Vec::new();
    };
    let idle = |m: &Measured| m.cpu.map_or(0.0, |c| c.idle);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Every unary call needs at least A's load-generator and server work, the hub's
    // validation and sealing of its rating, and B's storage work for one row, all on this
    // machine's cores; B's work per row is least in the largest group the callers can make,
    // all of them at once. Nothing else a hub does is counted: no look-ups, no decisions, no
    // hand-offs between threads, no idle core.
    let ceiling = cores * 1e6 / (a_load + a_server + prep + b_all);
    vec![
        Row {
            scenario: format!(
                "Unary CPU per call (µs: load generator + server; cores left idle of {cores})"
            ),
            value: format!("{hub_load:.0} + {hub:.0} (idle {:.2})", idle(unary)),
            baseline: format!(
                "A: {a_load:.0} + {a_server:.0} (idle {:.2}); the hub's validation and sealing: {prep:.1} per rating; B: {b32:.0} per row at batch {UNARY_GROUP}, {b_all:.0} at batch {callers}",
                idle(echo)
            ),
            ratio: "—".into(),
            target: "—".into(),
        },
        Row {
            scenario: format!(
                "Unary ceiling on this machine: {cores} cores ÷ (A's load generator + A's server + validation and sealing + B's CPU per row at batch {callers}) (calls/s)"
            ),
            value: format!("{ceiling:.0}"),
            baseline: format!("A: {:.0}", echo.rate),
            ratio: format!("{:.2}", ceiling / echo.rate),
            target: "— (unary asks ≥ 0.6)".into(),
        },
        Row {
            scenario: "CPU per rating, batches of 100 (µs: hub process; B's process)".into(),
            value: format!("{hub_batch:.0}"),
            baseline: format!("B: {b100:.0}"),
            ratio: format!("{:.2}", hub_batch / b100),
            target: "—".into(),
        },
    ]
}
