//! Where the CPU went during a measured phase, read from `/proc` (Linux): the machine's idle
//! share, and CPU time per operation of the database server (every `postgres` process, with the
//! backends that exited in between), the service process, and this process (the generator, the
//! in-process simulator, and children it waited for, such as `pgbench`). A throughput figure
//! beside a limit says how far apart they are; these say whether the machine had room left
//! and who spent it. On other systems there is no mark and the columns stay empty.

use serde::Serialize;

/// `/proc` counts CPU time in USER_HZ ticks, which Linux fixes at 100 for user space on every
/// architecture it exports times from.
const USER_HZ: f64 = 100.0;

/// Cumulative CPU counters at one moment, in clock ticks.
#[derive(Clone, Copy)]
pub(super) struct CpuMark {
    busy: u64,
    idle: u64,
    /// None when no Postgres server runs here (SQLite lives inside the service).
    db: Option<u64>,
    service: Option<u64>,
    bench: u64,
}

/// A phase's CPU per operation, in microseconds, and the machine's idle share.
#[derive(Serialize, Clone, Copy, Debug)]
pub(super) struct CpuUse {
    pub machine_idle_share: f64,
    pub db_cpu_us_per_op: Option<f64>,
    pub service_cpu_us_per_op: Option<f64>,
    pub generator_cpu_us_per_op: f64,
}

/// From `/proc/<pid>/stat`: (command name, parent's pid, utime + stime, cutime + cstime).
fn stat(path: &str) -> Option<(String, u32, u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s.get(open + 1..close)?.to_owned();
    let f: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse().ok()?;
    Some((comm, ppid, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// Every `postgres` process's own time, plus the reaped children of each postmaster (a
/// `postgres` whose parent is not one), so backends that ended inside the phase still count.
fn postgres_ticks() -> Option<u64> {
    let procs: Vec<(u32, String, u32, u64, u64)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let (comm, ppid, own, children) = stat(&format!("/proc/{pid}/stat"))?;
            Some((pid, comm, ppid, own, children))
        })
        .collect();
    let is_pg = |pid: u32| procs.iter().any(|p| p.0 == pid && p.1 == "postgres");
    let mut total = None;
    for (_, comm, ppid, own, children) in &procs {
        if comm == "postgres" {
            let reaped = if is_pg(*ppid) { 0 } else { *children };
            *total.get_or_insert(0) += own + reaped;
        }
    }
    total
}

/// The counters now; `service` is the service's process id, `postgres` whether the database is
/// a Postgres server here (SQLite's time is the service's).
pub(super) fn mark(service: Option<u32>, postgres: bool) -> Option<CpuMark> {
    let machine = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = machine
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are the room left.
    let idle = ticks.get(3)? + ticks.get(4)?;
    let busy = ticks.iter().take(8).sum::<u64>() - idle;
    let (_, _, own, children) = stat("/proc/self/stat")?;
    Some(CpuMark {
        busy,
        idle,
        db: if postgres { postgres_ticks() } else { None },
        service: service
            .and_then(|pid| stat(&format!("/proc/{pid}/stat")))
            .map(|s| s.2),
        bench: own + children,
    })
}

impl CpuMark {
    /// What was spent between this mark and `later`, over `ops` operations.
    pub(super) fn until(&self, later: &CpuMark, ops: usize) -> CpuUse {
        let per_op = |ticks: u64| ticks as f64 / USER_HZ * 1e6 / (ops.max(1) as f64);
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        CpuUse {
            machine_idle_share: idle / (idle + busy).max(1.0),
            db_cpu_us_per_op: delta(self.db, later.db).map(per_op),
            service_cpu_us_per_op: delta(self.service, later.service).map(per_op),
            generator_cpu_us_per_op: per_op(later.bench.saturating_sub(self.bench)),
        }
    }
}
